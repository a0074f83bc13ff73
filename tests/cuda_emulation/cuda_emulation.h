// CPU stand-ins for the CUDA language and runtime pieces that csrc/cuda/*.cu use, so that a .cu
// source, rewritten by tests/_cuda_emulation.py (a few explicit textual rules), compiles with the
// host C++ compiler and its kernels run on CPU threads: every block of a launch in turn, each block's
// threads as real std::threads, __syncthreads() a real barrier across them, __shared__ arrays one
// (function-local static) array per kernel instantiation that the block's threads share.
//
// Checks the emulation adds (a launch then fails with a RuntimeError naming them):
//  * __shared__ arrays are poisoned (all bytes 0xFF: NaN in float and double) at the start of every
//    block, so a read of shared memory that no thread of this block wrote shows up as NaN instead
//    of the zero of a C++ static or the previous block's data;
//  * every __syncthreads() of one barrier phase must be the same source line (a divergent barrier
//    is undefined behaviour in CUDA);
//  * no thread may reach __syncthreads() after another thread of its block has returned, nor
//    return while others wait at one (also undefined in CUDA; an exited thread is dropped from
//    the barrier, so this never deadlocks).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// ---- CUDA qualifiers: nothing on the host ------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- math: the float overloads a device function finds unqualified (CUDA's math headers declare
// exp(float) globally; <cmath> guarantees it only in std::) --------------------------------------
using std::exp;

// ---- built-in variables ------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// blocks run one at a time: the block's coordinates and the launch's shape are plain globals; the
// thread index is each std::thread's own
inline dim3 gridDim, blockDim, blockIdx;
inline thread_local dim3 threadIdx;

namespace cuda_emulation {

// A barrier over the threads of the running block (mutex + condition variable, generation counted).
class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : expected_(threads) {}

  void wait(int line) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (exited_ > 0)
      fail("__syncthreads() at line " + std::to_string(line) + " after a thread of the block returned");
    if (arrived_ == 0) {
      line_ = line;
    } else if (line_ != line) {
      fail("divergent __syncthreads(): lines " + std::to_string(line_) + " and " + std::to_string(line) +
           " in one barrier phase");
    }
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
    } else {
      ready_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  // a thread returned from the kernel: it leaves the barrier
  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    ++exited_;
    if (arrived_ > 0) {
      fail("a thread returned while others wait at __syncthreads() (line " + std::to_string(line_) + ")");
      if (arrived_ >= expected_) release();
    }
  }

  std::string error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    ready_.notify_all();
  }
  void fail(const std::string& what) {
    if (error_.empty()) error_ = what;
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  int expected_;
  int arrived_ = 0;
  int exited_ = 0;
  int line_ = -1;
  uint64_t generation_ = 0;
  std::string error_;
};

inline BlockBarrier* current_barrier = nullptr;  // the running block's

inline void syncthreads(int line) { current_barrier->wait(line); }

inline bool first_thread() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }

// A __shared__ array at its declaration: the block's first thread poisons it (0xFF bytes, NaN in
// float/double: CUDA shared memory starts undefined), then every thread waits for that.
inline void shared_prologue(void* array, size_t bytes, int line) {
  if (first_thread()) std::memset(array, 0xFF, bytes);
  syncthreads(line);
}

// one launch at a time in the process: the block's coordinates, the launch shape and the barrier are
// process-wide (Python threads calling the extension concurrently would otherwise mix them)
inline std::mutex launch_mutex;

// kernel<<<grid, block, 0, stream>>>(args...): every block in turn (x fastest, then y, z), each
// block's threads as std::threads. The arguments are converted to the kernel's parameter types
// once, as a CUDA launch copies them, and each thread calls the kernel on its own copy.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  TORCH_CHECK(threads > 0 && threads <= 1024, "cuda emulation: block of ", threads, " threads");
  const std::lock_guard<std::mutex> one_launch(launch_mutex);
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        BlockBarrier barrier(threads);
        current_barrier = &barrier;
        std::vector<std::exception_ptr> errors(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            try {
              std::apply(kernel, params);
            } catch (...) {
              errors[t] = std::current_exception();
            }
            barrier.drop();
          });
        }
        for (auto& thread : pool) thread.join();
        current_barrier = nullptr;
        for (auto& e : errors)
          if (e) std::rethrow_exception(e);
        const std::string error = barrier.error();
        TORCH_CHECK(error.empty(), "cuda emulation: block (", bx, ", ", by, ", ", bz, "): ", error);
      }
}

}  // namespace cuda_emulation

// ---- the c10/cuda pieces the launchers use -----------------------------------------------------
namespace c10 {
namespace cuda {
struct CUDAGuard {  // no device to switch to
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10

// the emulated launch has already thrown if it failed
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

#define __syncthreads() ::cuda_emulation::syncthreads(__LINE__)
