// Checked device memory for the CUDA emulator: what `Global<T>` and `Shared<T>` (csrc/cuda/device_memory.cuh)
// are under emulation.
//
//  - Ptr<T> (a kernel's global-memory pointer) carries the extent of the tensor it was made from; every access
//    through it is checked against that extent (an access outside stops the launch) and recorded.
//  - SharedArray<T[N]...> (a __shared__ array) is poisoned (0xFF bytes) before every block, and its accesses are
//    recorded per byte.
//  - The record finds races: two threads of a block touching the same address between two barriers, one of them
//    writing (a __syncwarp or shuffle orders only the lanes of its warp; atomics do not race with atomics), and,
//    in global memory, two blocks of one launch touching the same address, one writing. Accesses are compared
//    byte by byte, so accesses of different widths that overlap meet. In shared memory, and in global memory a
//    driver allocated inside a PoisonedWorkspaces scope (workspaces.h), it also finds reads of bytes not written.
// Elements are read and written as copies (Ref<T>), so a kernel sees the same values as with raw pointers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "emulator.h"
#include "workspaces.h"

namespace aecr_emulation {

enum class Access { Read, Write, Atomic };

struct Shadow;

// One __shared__ array of a kernel (or the dynamic shared memory of a launch), with a shadow cell per byte.
struct SharedRegion {
  unsigned char* data = nullptr;
  size_t bytes = 0;
  int index = 0;  // position among the kernel's arrays
  std::vector<Shadow>* shadow = nullptr;
};

// Where a pointer may go: [lo, hi), its memory and the kernel argument it came from.
struct Extent {
  const unsigned char* lo = nullptr;
  const unsigned char* hi = nullptr;
  SharedRegion* shared = nullptr;  // null: global memory
  int argument = -1;               // position among the kernel's parameters (global memory)
  bool tracked = true;             // accesses recorded for the race check (see launch_with)
  Workspace* workspace = nullptr;  // the poisoned allocation it lies in (workspaces.h), if any
};

// Checks one access of `bytes` bytes at `at` and records it; stops the launch when it leaves the extent.
void touch(const void* at, size_t bytes, Access kind, const Extent& extent);

SharedRegion* register_shared(unsigned char* data, size_t bytes);  // a kernel's __shared__ array, at its first use
void begin_launch(KernelInfo& kernel, const LaunchShape& shape);
void begin_block(KernelInfo& kernel);
void end_block(KernelInfo& kernel);
SharedRegion* dynamic_region();

template <typename T>
class Ptr;

// An element of device memory: reads and writes go through touch().
template <typename T>
class Ref {
  using V = std::remove_const_t<T>;

 public:
  Ref(T* p, const Extent& e) : p_(p), e_(e) {}
  Ref(const Ref&) = default;

  V load() const {
    touch(p_, sizeof(V), Access::Read, e_);
    V v;
    std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p_), sizeof(V));
    return v;
  }
  void store(const V& v) const
    requires(!std::is_const_v<T>)
  {
    touch(p_, sizeof(V), Access::Write, e_);
    std::memcpy(static_cast<void*>(p_), static_cast<const void*>(&v), sizeof(V));
  }

  operator V() const { return load(); }
  template <typename U>
    requires(!std::is_same_v<U, V> && std::is_constructible_v<U, V>)
  explicit operator U() const {
    return U(load());
  }

  // Assignment writes the element (a Ref is never re-seated).
  Ref& operator=(const V& v) {
    store(v);
    return *this;
  }
  Ref& operator=(const Ref& other) {
    store(other.load());
    return *this;
  }
  template <typename X>
  const Ref& operator+=(const X& x) const {
    store(static_cast<V>(load() + x));
    return *this;
  }
  template <typename X>
  const Ref& operator-=(const X& x) const {
    store(static_cast<V>(load() - x));
    return *this;
  }
  template <typename X>
  const Ref& operator*=(const X& x) const {
    store(static_cast<V>(load() * x));
    return *this;
  }
  template <typename X>
  const Ref& operator/=(const X& x) const {
    store(static_cast<V>(load() / x));
    return *this;
  }
  template <typename X>
  const Ref& operator|=(const X& x) const {
    store(static_cast<V>(load() | x));
    return *this;
  }

  Ptr<T> operator&() const { return Ptr<T>(p_, e_); }

 private:
  T* p_;
  Extent e_;
};

// A pointer into device memory with the extent it may access.
template <typename T>
class Ptr {
 public:
  using element_type = T;

  Ptr() = default;
  Ptr(std::nullptr_t) {}
  Ptr(T* p, const Extent& e) : p_(p), e_(e) {}
  template <typename U>
    requires std::is_convertible_v<U*, T*>
  Ptr(const Ptr<U>& other) : p_(other.raw()), e_(other.extent()) {}

  Ref<T> operator*() const { return Ref<T>(p_, e_); }
  Ref<T> operator[](int64_t i) const { return Ref<T>(p_ + i, e_); }

  template <typename I>
    requires std::is_integral_v<I>
  Ptr operator+(I i) const {
    return Ptr(p_ + i, e_);
  }
  Ptr operator+(int64_t i) const { return Ptr(p_ + i, e_); }
  template <typename I>
    requires std::is_integral_v<I>
  Ptr operator-(I i) const {
    return Ptr(p_ - i, e_);
  }
  int64_t operator-(const Ptr& other) const { return p_ - other.p_; }
  Ptr& operator+=(int64_t i) {
    p_ += i;
    return *this;
  }

  bool operator==(std::nullptr_t) const { return p_ == nullptr; }
  bool operator==(const Ptr& other) const { return p_ == other.p_; }
  explicit operator bool() const { return p_ != nullptr; }

  T* raw() const { return p_; }
  const Extent& extent() const { return e_; }
  Extent& extent() { return e_; }

 private:
  T* p_ = nullptr;
  Extent e_;
};

template <typename T>
Ptr<T> operator+(int64_t i, const Ptr<T>& p) {
  return p + i;
}

// ---- __shared__ arrays ---------------------------------------------------------------------------------------

template <typename E>
auto shared_element(unsigned char* p, SharedRegion* r);

// A sub-array of a __shared__ array: indexing checks each dimension.
template <typename E>
struct SharedView {
  unsigned char* p;
  SharedRegion* region;
  auto operator[](int64_t i) const {
    using F = std::remove_extent_t<E>;
    if (i < 0 || i >= static_cast<int64_t>(std::extent_v<E>)) {
      fail(where() + ": index " + std::to_string(i) + " outside [0, " + std::to_string(std::extent_v<E>) +
           ") of __shared__ array #" + std::to_string(region->index));
    }
    return shared_element<F>(p + i * sizeof(F), region);
  }
};

template <typename E>
auto shared_element(unsigned char* p, SharedRegion* r) {
  if constexpr (std::is_array_v<E>) {
    return SharedView<E>{p, r};
  } else {
    return Ref<E>(reinterpret_cast<E*>(p), Extent{r->data, r->data + r->bytes, r, -1, true});
  }
}

// `__shared__ Shared<A> name;`: A an array type (any rank) ...
template <typename A, bool = std::is_array_v<A>>
class SharedArray {
  using E = std::remove_all_extents_t<A>;

 public:
  SharedArray() : region_(register_shared(storage_, sizeof(A))) {}
  SharedArray(const SharedArray&) = delete;

  auto operator[](int64_t i) const { return SharedView<A>{storage_, region_}[i]; }

 private:
  alignas(32) alignas(E) mutable unsigned char storage_[sizeof(A)];
  SharedRegion* region_;
};

// ... or a single value.
template <typename A>
class SharedArray<A, false> {
 public:
  SharedArray() : region_(register_shared(storage_, sizeof(A))) {}
  SharedArray(const SharedArray&) = delete;

  Ref<A> ref() const {
    return Ref<A>(reinterpret_cast<A*>(storage_), Extent{storage_, storage_ + sizeof(A), region_, -1, true});
  }
  operator A() const { return ref().load(); }
  const SharedArray& operator=(const A& v) const {
    ref().store(v);
    return *this;
  }
  Ptr<A> operator&() const { return &ref(); }

 private:
  alignas(32) alignas(A) mutable unsigned char storage_[sizeof(A)];
  SharedRegion* region_;
};

// The launch's dynamic shared memory as T.
template <typename T>
Ptr<T> dynamic_shared() {
  SharedRegion* r = dynamic_region();
  return Ptr<T>(reinterpret_cast<T*>(r->data), Extent{r->data, r->data + r->bytes, r, -1, true});
}

// ---- Atomics -------------------------------------------------------------------------------------------------

template <typename T>
T atomic_update(const Ptr<T>& at, T (*op)(T, T), T v) {
  touch(at.raw(), sizeof(T), Access::Atomic, at.extent());
  T old;
  std::memcpy(&old, at.raw(), sizeof(T));
  const T next = op(old, v);
  std::memcpy(at.raw(), &next, sizeof(T));
  return old;
}

inline float atomicAdd(const Ptr<float>& at, float v) {
  return atomic_update<float>(at, [](float a, float b) { return a + b; }, v);
}
inline double atomicAdd(const Ptr<double>& at, double v) {
  return atomic_update<double>(at, [](double a, double b) { return a + b; }, v);
}
inline int atomicOr(const Ptr<int>& at, int v) {
  return atomic_update<int>(at, [](int a, int b) { return a | b; }, v);
}

// ---- Launch -------------------------------------------------------------------------------------------------

template <typename T>
struct is_ptr : std::false_type {};
template <typename T>
struct is_ptr<Ptr<T>> : std::true_type {};

template <typename T>
struct Argument<Ptr<T>> {
  template <typename A>
  static Ptr<T> make(A&& a, int index) {
    Ptr<T> p(std::forward<A>(a));
    p.extent().argument = index;
    return p;
  }
};

// Reads through a read-only argument can race only with writes through an argument it overlaps: the others
// are not recorded (most of a kernel's accesses are such reads).
template <typename Tuple, size_t... I>
void mark_tracked(Tuple& params, std::index_sequence<I...>) {
  std::vector<std::pair<const unsigned char*, const unsigned char*>> writable;
  auto collect = [&](auto& p) {
    using P = std::decay_t<decltype(p)>;
    if constexpr (is_ptr<P>::value) {
      if (!std::is_const_v<typename P::element_type> && p.raw() != nullptr) {
        writable.emplace_back(p.extent().lo, p.extent().hi);
      }
    }
  };
  (collect(std::get<I>(params)), ...);
  auto mark = [&](auto& p) {
    using P = std::decay_t<decltype(p)>;
    if constexpr (is_ptr<P>::value) {
      if (std::is_const_v<typename P::element_type>) {
        bool overlaps = false;
        for (const auto& w : writable) overlaps |= p.extent().lo < w.second && w.first < p.extent().hi;
        p.extent().tracked = overlaps;
      }
    }
  };
  (mark(std::get<I>(params)), ...);
}

template <typename... Params, typename... Args, size_t... I>
void launch_with(void (*kernel)(Params...), const LaunchShape& shape, std::index_sequence<I...> seq, Args&&... args) {
  KernelInfo& info = kernel_info(reinterpret_cast<const void*>(kernel));
  std::tuple<std::decay_t<Params>...> params{
      Argument<std::decay_t<Params>>::make(std::forward<Args>(args), static_cast<int>(I))...};
  mark_tracked(params, seq);
  run(info, shape, [&] { std::apply(kernel, params); });
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchShape& shape, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel called with the wrong number of arguments");
  launch_with(kernel, shape, std::index_sequence_for<Args...>{}, std::forward<Args>(args)...);
}

}  // namespace aecr_emulation
