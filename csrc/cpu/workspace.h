// The column workspaces of deform_conv2d on the CPU.
//
// A fresh buffer of tens of megabytes costs a page fault per 4 KB on first touch, as much time as sampling into
// it, so one buffer per dtype is cached for the next call. Only a buffer within the budget is cached, so nothing
// above it outlives a call; a call that finds the cached buffer in use (by another thread) gets a fresh one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>

namespace aecr {

class ColumnWorkspaces {
 public:
  // A buffer of `numel` elements, the cached one when it is free and large enough.
  at::Tensor acquire(int64_t numel, const at::TensorOptions& options, int64_t budget_bytes);
  // Frees the cached buffers (those in use are freed when their call ends); returns the bytes they held.
  int64_t release();
  int64_t cached_bytes();

 private:
  std::mutex mutex_;
  std::map<at::ScalarType, at::Tensor> cached_;
};

ColumnWorkspaces& column_workspaces();

}  // namespace aecr
