#include "cpu/workspace.h"

#include <torch/library.h>

namespace aecr {

at::Tensor ColumnWorkspaces::acquire(int64_t numel, const at::TensorOptions& options, int64_t budget_bytes) {
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  const std::lock_guard<std::mutex> lock(mutex_);
  // The cached buffer outlives the call: one made (or narrowed) under inference_mode would be an inference tensor
  // that a later call outside it may not write to. A normal tensor serves calls in and out of inference_mode.
  const c10::InferenceMode normal_tensors(false);
  at::Tensor& slot = cached_[c10::typeMetaToScalarType(options.dtype())];
  // Every view handed out shares the slot's storage: a count of one means no call holds it.
  const bool free = slot.defined() && slot.storage().use_count() == 1;
  if (free && slot.numel() >= numel) return slot.narrow(0, 0, numel);
  at::Tensor fresh = at::empty({numel}, options);
  if (bytes <= budget_bytes && (!slot.defined() || free)) slot = fresh;
  return fresh;
}

int64_t ColumnWorkspaces::release() {
  const std::lock_guard<std::mutex> lock(mutex_);
  int64_t bytes = 0;
  for (auto& entry : cached_) bytes += entry.second.defined() ? entry.second.nbytes() : 0;
  cached_.clear();
  return bytes;
}

int64_t ColumnWorkspaces::cached_bytes() {
  const std::lock_guard<std::mutex> lock(mutex_);
  int64_t bytes = 0;
  for (auto& entry : cached_) bytes += entry.second.defined() ? entry.second.nbytes() : 0;
  return bytes;
}

ColumnWorkspaces& column_workspaces() {
  static ColumnWorkspaces* workspaces = new ColumnWorkspaces();  // never destroyed: no order problem at exit
  return *workspaces;
}

namespace {
int64_t release_workspaces() { return column_workspaces().release(); }
int64_t workspace_bytes() { return column_workspaces().cached_bytes(); }
}  // namespace

// No tensor arguments: the CompositeImplicitAutograd kernel serves every call.
TORCH_LIBRARY_IMPL(aecr_ops, CompositeImplicitAutograd, m) {
  m.impl("release_workspaces", &release_workspaces);
  m.impl("workspace_bytes", &workspace_bytes);
}

}  // namespace aecr
