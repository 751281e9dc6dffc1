#include "dtype_pairs.h"

#include <algorithm>

namespace lookahead {

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    case c10::ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    case c10::ScalarType::Float8_e5m2: return "torch.float8_e5m2";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string supported_pairs_text() {
  std::string text;
  for (const auto& [slow, fast] : supported_pairs()) {
    if (!text.empty()) text += ", ";
    text += "(" + dtype_name(slow) + ", " + dtype_name(fast) + ")";
  }
  return text;
}

std::vector<c10::ScalarType> supported_dtypes() {
  std::vector<c10::ScalarType> dtypes;
  for (const auto& [slow, fast] : supported_pairs()) {
    for (const c10::ScalarType t : {slow, fast}) {
      if (std::find(dtypes.begin(), dtypes.end(), t) == dtypes.end()) dtypes.push_back(t);
    }
  }
  return dtypes;
}

std::string supported_dtypes_text() {
  std::string text;
  for (const c10::ScalarType t : supported_dtypes()) {
    if (!text.empty()) text += ", ";
    text += dtype_name(t);
  }
  return text;
}

}  // namespace lookahead
