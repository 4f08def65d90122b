// CPU kernels of prefixattn::onednn_linear and prefixattn::onednn_linear_group, in C++.
//
// The ops are defined (schemas, fake kernels, the Python implementation) in cpu_linear.py.
// A compiled decode step calls them from Inductor's C++ wrapper through the dispatcher
// (121 calls per SmolLM2 step); with only the Python implementation registered, each call
// takes the GIL and runs ~15 us of Python around its GEMM, and waits for the GIL
// whenever the server's HTTP or tokenizer thread holds it. These kernels serve the common
// case without Python:
//
//   x, weights, biases ──> the weights' data pointers ──> the table's entries: runs of
//   them that are a packed sibling group (longest first), else single packed weights
//     every part current (each weight's version as packed; for a group, each bias's
//     (data pointer, version) as packed) and x non-empty
//       ──> per part mkldnn::_linear_pointwise(x, part.packed, bias, "none", [], ""),
//           concatenated when there are several (a parallel attention + MLP block)
//     anything else (a weight with no packed copy, changed or replaced since, an empty
//     x, the kernels disabled) ──> the Python implementation, with the GIL (the same
//     result; it counts its fallbacks as it always did)
//
// The table mirrors cpu_linear.py's _REGISTRY (single weights) and _GROUPS (sibling
// groups): Python puts an entry whenever it registers one and removes it whenever it
// drops one. Entries hold the packed tensors (and a group's fused bias).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

struct Single {
  at::Tensor packed;
  int64_t version;
};

struct Group {
  at::Tensor packed;
  std::optional<at::Tensor> bias;  // fused (missing members' biases as zeros)
  std::vector<int64_t> versions;   // of the weights, in order
  std::vector<int64_t> bias_ptrs;  // 0: no bias
  std::vector<int64_t> bias_versions;
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = k.size();
    for (int64_t v : k) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

std::mutex mu;
std::unordered_map<int64_t, Single> singles;
std::unordered_map<std::vector<int64_t>, Group, KeyHash> groups;
std::map<size_t, int> group_lengths;  // weights per group -> how many groups have that many
// the Python implementations (leaked on purpose: never destroyed after the interpreter)
PyObject* py_single = nullptr;
PyObject* py_group = nullptr;
std::atomic<bool> enabled{true};  // false: every call goes to Python (tests, A/B runs)
std::atomic<int64_t> native_calls{0};
std::atomic<int64_t> python_calls{0};

int64_t ptr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::string_view,
                                         c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<at::Scalar>>(),
                 c10::string_view(""));
}

at::Tensor call_python(PyObject* fn, const py::tuple& args) {
  TORCH_CHECK(fn != nullptr, "prefixattn: the native linear ops have no Python fallback set");
  py::object r = py::reinterpret_borrow<py::object>(fn)(*args);
  return r.cast<at::Tensor>();
}

at::Tensor onednn_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, bool transposed) {
  if (x.numel() > 0 && enabled.load(std::memory_order_relaxed)) {
    at::Tensor packed;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = singles.find(ptr(weight));
      if (it != singles.end() && it->second.version == weight._version()) packed = it->second.packed;
    }
    if (packed.defined()) {
      native_calls.fetch_add(1, std::memory_order_relaxed);
      return linear_pointwise(x, packed, bias);
    }
  }
  python_calls.fetch_add(1, std::memory_order_relaxed);
  py::gil_scoped_acquire gil;
  return call_python(py_single, py::make_tuple(x, weight, bias, transposed));
}

// One part of a group op's plan: a packed weight and the bias to add.
struct Part {
  at::Tensor packed;
  std::optional<at::Tensor> bias;
};

// The plan of cpu_linear.py's _group_plan, when every part is current: runs of the
// weights that are a registered group (longest first), else single packed weights.
// False when a part has no current packed copy (the Python kernel decides then).
bool plan(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
          std::vector<Part>& parts) {
  const size_t n = weights.size();
  std::vector<int64_t> ptrs;
  ptrs.reserve(n);
  for (const auto& w : weights) ptrs.push_back(ptr(w));
  std::lock_guard<std::mutex> lock(mu);
  size_t i = 0;
  while (i < n) {
    const Group* g = nullptr;
    for (auto len = group_lengths.rbegin(); len != group_lengths.rend() && !g; ++len) {
      if (len->first > n - i) continue;
      auto it = groups.find(std::vector<int64_t>(ptrs.begin() + i, ptrs.begin() + i + len->first));
      if (it != groups.end()) g = &it->second;
    }
    if (g != nullptr) {
      for (size_t j = 0; j < g->versions.size(); ++j) {
        std::optional<at::Tensor> b = biases.get(i + j);
        bool same_bias = b.has_value() && b->defined()
                             ? ptr(*b) == g->bias_ptrs[j] && b->_version() == g->bias_versions[j]
                             : g->bias_ptrs[j] == 0;
        if (weights[i + j]._version() != g->versions[j] || !same_bias) return false;
      }
      parts.push_back(Part{g->packed, g->bias});
      i += g->versions.size();
      continue;
    }
    auto it = singles.find(ptrs[i]);
    if (it == singles.end() || it->second.version != weights[i]._version()) return false;
    parts.push_back(Part{it->second.packed, biases.get(i)});
    i += 1;
  }
  return true;
}

at::Tensor onednn_linear_group_cpu(const at::Tensor& x, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases) {
  std::vector<Part> parts;
  if (x.numel() > 0 && biases.size() == weights.size() && !weights.empty() &&
      enabled.load(std::memory_order_relaxed) && plan(weights, biases, parts)) {
    native_calls.fetch_add(1, std::memory_order_relaxed);
    if (parts.size() == 1) return linear_pointwise(x, parts[0].packed, parts[0].bias);
    std::vector<at::Tensor> outs;
    for (const auto& part : parts) outs.push_back(linear_pointwise(x, part.packed, part.bias));
    return at::cat(outs, -1);
  }
  python_calls.fetch_add(1, std::memory_order_relaxed);
  std::vector<std::optional<at::Tensor>> bs;
  for (size_t i = 0; i < biases.size(); ++i) bs.push_back(biases.get(i));
  py::gil_scoped_acquire gil;
  return call_python(py_group, py::make_tuple(x, weights.vec(), bs));
}

}  // namespace

TORCH_LIBRARY_IMPL(prefixattn, CPU, m) {
  m.impl("onednn_linear", &onednn_linear_cpu);
  m.impl("onednn_linear_group", &onednn_linear_group_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_fallbacks", [](py::object single, py::object group) {
    Py_XDECREF(py_single);
    Py_XDECREF(py_group);
    py_single = single.release().ptr();
    py_group = group.release().ptr();
  });
  m.def("set_enabled", [](bool on) { enabled.store(on); });
  m.def("put_single", [](int64_t key, const at::Tensor& packed, int64_t version) {
    std::lock_guard<std::mutex> lock(mu);
    singles[key] = Single{packed, version};
  });
  m.def("remove_single", [](int64_t key) {
    std::lock_guard<std::mutex> lock(mu);
    singles.erase(key);
  });
  m.def("put_group", [](std::vector<int64_t> key, const at::Tensor& packed,
                        std::optional<at::Tensor> bias, std::vector<int64_t> versions,
                        std::vector<int64_t> bias_ptrs, std::vector<int64_t> bias_versions) {
    TORCH_CHECK(versions.size() == key.size() && bias_ptrs.size() == key.size() &&
                    bias_versions.size() == key.size(),
                "put_group: key, versions and bias keys differ in length");
    std::lock_guard<std::mutex> lock(mu);
    if (groups.find(key) == groups.end()) group_lengths[key.size()] += 1;
    groups[key] = Group{packed, bias, versions, bias_ptrs, bias_versions};
  });
  m.def("remove_group", [](std::vector<int64_t> key) {
    std::lock_guard<std::mutex> lock(mu);
    if (groups.erase(key) && --group_lengths[key.size()] == 0) group_lengths.erase(key.size());
  });
  m.def("clear", []() {  // at interpreter exit: no tensor outlives Python in the table
    std::lock_guard<std::mutex> lock(mu);
    singles.clear();
    groups.clear();
    group_lengths.clear();
  });
  m.def("stats", []() {
    std::lock_guard<std::mutex> lock(mu);
    py::dict d;
    d["enabled"] = enabled.load();
    d["native_calls"] = native_calls.load();
    d["python_calls"] = python_calls.load();
    d["singles"] = singles.size();
    d["groups"] = groups.size();
    return d;
  });
}
