// Test-only: a CUDA device guard for a CPU-only torch build, so that autograd can run
// on FakeTensorMode tensors whose device is "cuda" (no memory is ever allocated: fake
// tensors are meta tensors underneath). Built at test time against the installed
// torch's headers (tests/fake_cuda/__init__.py); never shipped, never committed built.
//
// Why: autograd asks the device guard of every input's device type (InputMetadata,
// the engine's per-device threads, stream bookkeeping). A CPU-only build registers
// none for CUDA, so `requires_grad` on a fake CUDA tensor aborts the process with
// "PyTorch is not linked with support for cuda devices".
//
// And CUDA hooks that say CUDA is there (hasCUDA, device count, primary context), which
// autograd's stream bookkeeping asks (at::getAccelerator) before it runs a backward.
// Both register themselves when the library is loaded, which must happen before
// `import torch` (ATen caches the hooks at first use).
//
// FAKE_CUDA_DEVICES (environment, default 1) is the device count it reports.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdlib>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

thread_local DeviceIndex current_index = 0;

DeviceIndex count_from_env() {
  const char* value = std::getenv("FAKE_CUDA_DEVICES");
  return static_cast<DeviceIndex>(value ? std::atoi(value) : 1);
}

struct FakeCUDAGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device d) const override {
    Device old = getDevice();
    current_index = d.index() < 0 ? 0 : d.index();
    return old;
  }
  Device getDevice() const override { return Device(DeviceType::CUDA, current_index); }
  void setDevice(Device d) const override { current_index = d.index() < 0 ? 0 : d.index(); }
  void uncheckedSetDevice(Device d) const noexcept override { current_index = d.index() < 0 ? 0 : d.index(); }
  // One stream per device (id 0, the default stream): streams and events are no-ops, so
  // the engine's cross-stream synchronisation has nothing to wait for.
  Stream getStream(Device d) const override { return Stream(Stream::DEFAULT, d); }
  Stream getDefaultStream(Device d) const override { return Stream(Stream::DEFAULT, d); }
  Stream getStreamFromGlobalPool(Device d, bool = false) const override { return Stream(Stream::DEFAULT, d); }
  Stream getNewStream(Device d, int = 0) const override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const override { return Stream(Stream::DEFAULT, s.device()); }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  DeviceIndex deviceCount() const noexcept override { return count_from_env(); }
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const Stream&) const override {}
};

struct FakeCUDAHooks final : public at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return count_from_env(); }
  int getNumGPUs() const override { return count_from_env(); }
  DeviceIndex current_device() const override { return current_index; }
  DeviceIndex getCurrentDevice() const override { return current_index; }
  void setCurrentDevice(DeviceIndex d) const override { current_index = d; }
};

}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, FakeCUDAGuardImpl);
namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks)  // the key ATen looks up
}
