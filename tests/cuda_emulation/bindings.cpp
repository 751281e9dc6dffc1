// The emulation's Python module (built by tests/emulated_cuda.py, never installed).
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

#include "access_checker.h"
#include "device_memory.h"
#include "emulated_ops.h"
#include "report.h"

namespace emulation = lookahead::emulation;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::enum_<emulation::Expect>(m, "Expect")
      .value("written", emulation::Expect::kWritten)
      .value("read", emulation::Expect::kRead)
      .value("read_only", emulation::Expect::kReadOnly)
      .value("untouched", emulation::Expect::kUntouched)
      .value("any", emulation::Expect::kAny);
  py::class_<emulation::LaunchOptions>(m, "LaunchOptions")
      .def(py::init([](int max_grid, std::vector<emulation::Expect> expect,
                       std::vector<int> blocks, std::vector<int> threads, double timeout_s,
                       int table) {
             emulation::LaunchOptions options;
             options.max_grid = max_grid;
             options.expect = std::move(expect);
             options.selection = {std::move(blocks), std::move(threads)};
             options.timeout_s = timeout_s;
             options.only_table = table;
             return options;
           }),
           py::arg("max_grid"), py::arg("expect") = std::vector<emulation::Expect>{},
           py::arg("blocks") = std::vector<int>{}, py::arg("threads") = std::vector<int>{},
           py::arg("timeout_s") = 60.0, py::arg("table") = -1);
  py::class_<emulation::PhantomRecord>(m, "PhantomRecord")
      .def_readonly("thread", &emulation::PhantomRecord::thread)
      .def_readonly("list", &emulation::PhantomRecord::list)
      .def_readonly("item", &emulation::PhantomRecord::item)
      .def_readonly("first", &emulation::PhantomRecord::first)
      .def_readonly("last", &emulation::PhantomRecord::last)
      .def_readonly("reads", &emulation::PhantomRecord::reads)
      .def_readonly("writes", &emulation::PhantomRecord::writes);
  py::class_<emulation::Report>(m, "Report")
      .def_readonly("violations", &emulation::Report::violations)
      .def_readonly("violation_count", &emulation::Report::violation_count)
      .def_readonly("counters", &emulation::Report::counters)
      .def_readonly("grids", &emulation::Report::grids)
      .def_readonly("table_counts", &emulation::Report::table_counts)
      .def_readonly("records", &emulation::Report::records);
  py::class_<emulation::TableSummary>(m, "TableSummary")
      .def_readonly("total_chunks", &emulation::TableSummary::total_chunks)
      .def_readonly("items", &emulation::TableSummary::items)
      .def_readonly("numel", &emulation::TableSummary::numel)
      .def_readonly("first_chunk", &emulation::TableSummary::first_chunk);

  m.def("guarded_empty", &emulation::guarded_empty, py::arg("numel"), py::arg("dtype"));
  m.def("update", &emulation::emulate_update, py::arg("slow"), py::arg("fast"), py::arg("alpha"),
        py::arg("due"), py::arg("restore"), py::arg("options"));
  m.def("momentum_update", &emulation::emulate_momentum_update, py::arg("slow"), py::arg("fast"),
        py::arg("momentum"), py::arg("lr"), py::arg("mu"), py::arg("nesterov"), py::arg("due"),
        py::arg("restore"), py::arg("options"));
  m.def("found_nonfinite", &emulation::emulate_found_nonfinite, py::arg("tensors"),
        py::arg("found"), py::arg("due"), py::arg("options"));
  m.def("quantize", &emulation::emulate_quantize, py::arg("slow"), py::arg("fast"),
        py::arg("payload"), py::arg("scales"), py::arg("options"));
  m.def("dequantize_mean", &emulation::emulate_dequantize_mean, py::arg("slow"), py::arg("out"),
        py::arg("payloads"), py::arg("scales"), py::arg("options"));
  m.def("pack_phantom", &emulation::pack_phantom, py::arg("numels"));
  m.def("phantom_update", &emulation::emulate_phantom_update, py::arg("numels"),
        py::arg("options"));
  m.def("faulty", &emulation::emulate_faulty, py::arg("fault"), py::arg("tensors"),
        py::arg("flag"), py::arg("options"));
}
