// Runtime CPU dispatch: the extension loads the CPU kernels of one ISA level, a library per
// level (mbf/cpu_kernels.h says why), chosen from the CPU's features or forced lower.
#include "dispatch.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>

#include <c10/util/Exception.h>

#include "mbf/cpu_features.h"

namespace mbf {
namespace cpu {
namespace {

std::atomic<const CpuKernels*> g_active{nullptr};
std::mutex g_mutex;
std::map<std::string, const CpuKernels*> g_loaded;  // level -> table (libraries stay loaded)

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

const CpuKernels* load(const std::string& dir, const std::string& level) {
  auto it = g_loaded.find(level);
  if (it != g_loaded.end()) return it->second;
  const std::string prefix = "_cpu_" + level + ".";
  std::string path;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.size() > 3 && name.substr(name.size() - 3) == ".so") {
      path = entry.path().string();
      break;
    }
  }
  TORCH_CHECK(!path.empty(), "mbf_kernels: the CPU kernels for level '", level,
              "' (_cpu_", level, "*.so) are not in ", dir, "; rebuild the package");
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "mbf_kernels: cannot load ", path, ": ", dlerror());
  using Entry = const CpuKernels* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, "mbf_cpu_kernels"));
  TORCH_CHECK(entry != nullptr, "mbf_kernels: ", path, " has no mbf_cpu_kernels()");
  const CpuKernels* table = entry();
  TORCH_CHECK(table->version == kCpuKernelsVersion, "mbf_kernels: ", path, " is version ",
              table->version, ", this extension needs ", kCpuKernelsVersion,
              "; rebuild the package");
  g_loaded[level] = table;
  return table;
}

}  // namespace

std::vector<std::string> known_levels() {
#if defined(__x86_64__) || defined(__i386__)
  return {"scalar", "avx2", "avx512"};
#else
  return {"default"};
#endif
}

std::vector<std::string> supported_levels() {
  std::vector<std::string> out;
  for (const auto& level : known_levels())
    if (cpu_runs_level(level)) out.push_back(level);
  return out;
}

std::string use_level(const std::string& dir, const std::string& requested) {
  const auto known = known_levels();
  const auto supported = supported_levels();
  std::string level = requested.empty() ? supported.back() : requested;
  TORCH_CHECK(std::find(known.begin(), known.end(), level) != known.end(),
              "mbf_kernels: unknown CPU capability '", level, "'; choose one of ", join(known));
  TORCH_CHECK(cpu_runs_level(level), "mbf_kernels: this CPU cannot run the '", level,
              "' kernels; it runs ", join(supported));
  std::lock_guard<std::mutex> lock(g_mutex);
  const CpuKernels* table = load(dir, level);
  g_active.store(table, std::memory_order_release);
  return table->isa;
}

const CpuKernels& kernels() {
  const CpuKernels* table = g_active.load(std::memory_order_acquire);
  TORCH_CHECK(table != nullptr, "mbf_kernels: no CPU kernels loaded (mbf_kernels/_extension.py "
              "loads them at import)");
  return *table;
}

}  // namespace cpu
}  // namespace mbf
