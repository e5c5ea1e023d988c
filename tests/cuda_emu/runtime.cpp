// The execution model behind include/cuda_runtime.h: a launch runs its blocks one after another on the calling OS
// thread; inside a block every CUDA thread is a ucontext coroutine with its own stack. A thread runs until it reaches
// __syncthreads, a warp collective or its end; the scheduler then resumes another runnable thread, and releases a
// barrier once every thread it names has arrived at the same call. Misuse that hangs or is undefined on a GPU (a
// barrier some thread never reaches, divergent warp collectives, masks naming absent lanes, too much shared memory)
// raises a c10::Error naming the kernel's source line, block and thread. CUDA_EMU_SEED=<n> runs the blocks and picks
// the next thread in a random order drawn from n.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace cuda_emu {
namespace detail {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
}  // namespace detail

namespace {

constexpr std::size_t kStackBytes = std::size_t(256) << 10;
constexpr std::size_t kStaticSharedBytes = std::size_t(48) << 10;
constexpr int kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;

enum class State { kRunnable, kAtBarrier, kAtWarpOp, kExited };

struct Thread {
  ucontext_t context;
  uint3 index;
  int lane, warp;
  State state;
  Site site;  // of the barrier or collective it waits at
  WarpOp op;
  unsigned mask;
  int arg, width;
  uint64_t value, result;
};

// Lanes of one warp waiting at one collective.
struct WarpGroup {
  WarpOp op;
  unsigned mask, arrived;
  Site site;
};

struct SharedVar {
  int id;
  std::size_t offset, size;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

// file:line as the original source names it (the rewritten sources start with a #line directive)
std::string where(const Site& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line());
}

std::string str(const uint3& i) {
  return "(" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
}

std::string hex(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

bool same(const Site& a, const Site& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Thread stacks, reused by every launch; a PROT_NONE page below each turns an overflow into a crash, not corruption.
std::vector<char*>& stacks(std::size_t count) {
  static std::vector<char*> pool;
  static const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
  while (pool.size() < count) {
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda_emu: cannot map a thread stack");
    mprotect(p, page, PROT_NONE);
    pool.push_back(static_cast<char*>(p) + page);
  }
  return pool;
}

cudaError_t last_error = cudaSuccess;

class Grid;
thread_local Grid* active = nullptr;  // the launch running on this OS thread (launches are serialised)
void thread_main();

class Grid {
 public:
  Grid(dim3 grid, dim3 block, void (*body)(void*), void* call, Site site, std::optional<uint64_t> seed)
      : grid_(grid), block_(block), body_(body), call_(call), launch_site_(site),
        threads_(std::size_t(block.x) * block.y * block.z), warps_((threads_.size() + kWarpSize - 1) / kWarpSize),
        shared_(kStaticSharedBytes) {
    if (seed) {
      rng_.emplace(*seed);
    }
    std::vector<char*>& stack = stacks(threads_.size());
    for (std::size_t i = 0; i < threads_.size(); ++i) {
      Thread& t = threads_[i];
      t.index = {unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / block.x / block.y)};
      t.lane = int(i % kWarpSize);
      t.warp = int(i / kWarpSize);
      getcontext(&t.context);  // once: each block only resets the entry point (makecontext)
      t.context.uc_stack.ss_sp = stack[i];
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = nullptr;
    }
  }

  void run() {
    const uint64_t blocks = uint64_t(grid_.x) * grid_.y * grid_.z;
    std::vector<uint64_t> order;
    if (rng_) {
      order.resize(blocks);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), *rng_);
    }
    for (uint64_t n = 0; n < blocks; ++n) {
      const uint64_t b = rng_ ? order[n] : n;
      run_block({unsigned(b % grid_.x), unsigned(b / grid_.x % grid_.y), unsigned(b / grid_.x / grid_.y)});
    }
  }

  // Called by the running thread.
  void syncthreads(Site site) {
    Thread& t = current();
    check_not_awaited(t, [&] { return "reaches __syncthreads at " + where(site); });
    t.state = State::kAtBarrier;
    t.site = site;
    ++at_barrier_;
    release_barrier_if_complete();
    suspend();
  }

  uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site) {
    Thread& t = current();
    const auto call = [&] { return std::string(op_name(op)) + " at " + where(site) + " with mask " + hex(mask); };
    const int lanes = std::min<int>(kWarpSize, int(threads_.size()) - t.warp * kWarpSize);
    const unsigned present = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
    if (mask & ~present) {
      fail(call() + " names lanes that do not exist: warp " + std::to_string(t.warp) + " of this block of " +
           std::to_string(threads_.size()) + " threads has " + std::to_string(lanes) + " lanes");
    }
    if (!(mask & (1u << t.lane))) {
      fail(call() + " does not name the calling lane " + std::to_string(t.lane));
    }
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
      fail(call() + ": width " + std::to_string(width) + " is not a power of 2 up to 32");
    }
    std::vector<WarpGroup>& groups = warps_[t.warp];
    auto group = std::find_if(groups.begin(), groups.end(), [&](const WarpGroup& g) { return g.mask >> t.lane & 1; });
    if (group != groups.end() && (group->op != op || group->mask != mask || !same(group->site, site))) {
      fail("divergent warp: lane " + std::to_string(t.lane) + " calls " + call() + " while lanes " +
           hex(group->arrived) + " wait at " + op_name(group->op) + " at " + where(group->site) + " with mask " +
           hex(group->mask));
    }
    for (int lane = 0; lane < lanes; ++lane) {
      const Thread& other = threads_[t.warp * kWarpSize + lane];
      if (!(mask >> lane & 1) || lane == t.lane) {
        continue;
      }
      if (other.state == State::kExited) {
        fail(call() + " names lane " + std::to_string(lane) + ", which has exited");
      }
      if (other.state == State::kAtBarrier || (other.state == State::kAtWarpOp && group == groups.end())) {
        fail("divergent warp: " + call() + " names lane " + std::to_string(lane) + ", which waits at " +
             (other.state == State::kAtBarrier ? std::string("__syncthreads") : op_name(other.op)) + " at " +
             where(other.site));
      }
    }
    if (group == groups.end()) {
      groups.push_back({op, mask, 0, site});
      group = groups.end() - 1;
    }
    t.state = State::kAtWarpOp;
    t.site = site;
    t.op = op;
    t.mask = mask;
    t.arg = arg;
    t.width = width;
    t.value = value;
    group->arrived |= 1u << t.lane;
    if (group->arrived == group->mask) {
      const WarpGroup done = *group;
      groups.erase(group);
      complete(t.warp, done);
    }
    suspend();
    return current().result;
  }

  void* shared_alloc(int id, std::size_t size, std::size_t align, Site site) {
    for (const SharedVar& v : shared_vars_) {
      if (v.id == id) {
        return shared_.data() + v.offset;
      }
    }
    const std::size_t offset = (shared_used_ + align - 1) / align * align;
    if (offset + size > kStaticSharedBytes) {
      fail("__shared__ variable at " + where(site) + " brings the block's static shared memory to " +
           std::to_string(offset + size) + " bytes, over the 48 KiB limit");
    }
    shared_vars_.push_back({id, offset, size});
    shared_used_ = offset + size;
    return shared_.data() + offset;
  }

  // Runs on the thread's own stack: the kernel body, then the bookkeeping of its exit.
  void thread_body() {
    try {
      body_(call_);
    } catch (...) {
      exception_ = std::current_exception();
      swapcontext(&current().context, &scheduler_);
    }
    Thread& t = current();
    check_not_awaited(t, [] { return std::string("exits"); });
    t.state = State::kExited;
    ++exited_;
    release_barrier_if_complete();
    if (runnable_.empty()) {
      setcontext(&scheduler_);
    }
    resume_next();
    setcontext(&current().context);
  }

 private:
  Thread& current() { return threads_[current_]; }

  // Stops the running thread with an error; the scheduler raises it.
  [[noreturn]] void fail(const std::string& message) {
    error_ = message;
    swapcontext(&current().context, &scheduler_);
    std::abort();  // a thread that failed is never resumed
  }

  // The running thread waits: the next runnable thread resumes (no detour through the scheduler's context).
  void suspend() {
    Thread& self = current();
    if (runnable_.empty()) {
      swapcontext(&self.context, &scheduler_);
      return;
    }
    resume_next();
    if (&current() != &self) {
      swapcontext(&self.context, &current().context);
    }
  }

  void resume_next() {
    current_ = next_runnable();
    detail::thread_idx = current().index;
  }

  void make_runnable(int i) {
    threads_[i].state = State::kRunnable;
    runnable_.push_back(i);
  }

  // A collective that names thread t waits for it: t must not go elsewhere (`action()` says where it goes).
  template <typename F>
  void check_not_awaited(const Thread& t, F action) {
    for (const WarpGroup& g : warps_[t.warp]) {
      if (g.mask >> t.lane & 1) {
        fail("divergent warp: lane " + std::to_string(t.lane) + " " + action() + " while lanes " + hex(g.arrived) +
             " wait for it at " + op_name(g.op) + " at " + where(g.site) + " with mask " + hex(g.mask));
      }
    }
  }

  void release_barrier_if_complete() {
    const std::size_t n = threads_.size();
    if (at_barrier_ == 0 || at_barrier_ + exited_ < n) {
      return;
    }
    const Thread* waiting = nullptr;
    for (const Thread& t : threads_) {
      if (t.state == State::kAtBarrier && waiting == nullptr) {
        waiting = &t;
      }
    }
    for (const Thread& t : threads_) {
      if (t.state == State::kExited) {
        fail("__syncthreads at " + where(waiting->site) + " is never reached by thread " + str(t.index) +
             ", which has exited (a barrier in code that not every thread runs)");
      }
      if (!same(t.site, waiting->site)) {
        fail("threads wait at different __syncthreads: " + where(waiting->site) + " (thread " + str(waiting->index) +
             ") and " + where(t.site) + " (thread " + str(t.index) + ")");
      }
    }
    at_barrier_ = 0;
    for (std::size_t i = 0; i < n; ++i) {
      make_runnable(int(i));
    }
  }

  void complete(int warp, const WarpGroup& g) {
    Thread* lanes = &threads_[std::size_t(warp) * kWarpSize];
    uint64_t votes = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (g.mask >> lane & 1) {
        votes |= uint64_t(lanes[lane].value != 0) << lane;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(g.mask >> lane & 1)) {
        continue;
      }
      Thread& t = lanes[lane];
      const int base = lane & ~(t.width - 1);
      int src = lane;
      switch (g.op) {
        case WarpOp::kSync: t.result = 0; break;
        case WarpOp::kBallot: t.result = votes; break;
        case WarpOp::kAny: t.result = votes != 0; break;
        case WarpOp::kAll: t.result = votes == g.mask; break;
        case WarpOp::kShfl: src = base + (t.arg & (t.width - 1)); break;
        case WarpOp::kShflUp: src = lane - t.arg >= base ? lane - t.arg : lane; break;
        case WarpOp::kShflDown: src = lane + t.arg < base + t.width ? lane + t.arg : lane; break;
        case WarpOp::kShflXor: src = (lane ^ t.arg) < base + t.width ? lane ^ t.arg : lane; break;
      }
      if (g.op == WarpOp::kShfl || g.op == WarpOp::kShflUp || g.op == WarpOp::kShflDown || g.op == WarpOp::kShflXor) {
        if (!(g.mask >> src & 1)) {
          fail(std::string(op_name(g.op)) + " at " + where(g.site) + ": lane " + std::to_string(lane) +
               " reads lane " + std::to_string(src) + ", which is not in the mask " + hex(g.mask));
        }
        t.result = lanes[src].value;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (g.mask >> lane & 1) {
        make_runnable(warp * kWarpSize + lane);
      }
    }
  }

  int next_runnable() {
    std::size_t pick = 0;
    if (rng_) {
      pick = std::uniform_int_distribution<std::size_t>(0, runnable_.size() - 1)(*rng_);
      std::swap(runnable_[pick], runnable_.front());
    }
    const int i = runnable_.front();
    runnable_.pop_front();
    return i;
  }

  void run_block(uint3 block_index) {
    detail::block_idx = block_index;
    std::fill(shared_.begin(), shared_.end(), 0xff);  // NaN in every floating type: reads before writes show
    shared_vars_.clear();
    shared_used_ = 0;
    at_barrier_ = exited_ = 0;
    for (std::size_t i = 0; i < threads_.size(); ++i) {
      Thread& t = threads_[i];
      t.site = Site();
      makecontext(&t.context, thread_main, 0);
      make_runnable(int(i));
    }
    while (!runnable_.empty()) {
      resume_next();
      swapcontext(&scheduler_, &current().context);
      if (exception_) {
        std::rethrow_exception(exception_);
      }
      TORCH_CHECK(error_.empty(), "cuda_emu: ", error_, " (kernel launched at ", where(launch_site_), ", block ",
                  str(block_index), ", thread ", str(current().index), ")");
    }
    for (const Thread& t : threads_) {
      TORCH_CHECK(t.state == State::kExited, "cuda_emu: deadlock: thread ", str(t.index), " waits forever at ",
                  where(t.site), " (kernel launched at ", where(launch_site_), ", block ", str(block_index), ")");
    }
  }

  dim3 grid_, block_;
  void (*body_)(void*);
  void* call_;
  Site launch_site_;
  std::vector<Thread> threads_;
  std::vector<std::vector<WarpGroup>> warps_;
  std::deque<int> runnable_;
  std::optional<std::mt19937_64> rng_;
  ucontext_t scheduler_;
  int current_ = 0;
  std::size_t at_barrier_ = 0, exited_ = 0;
  std::string error_;
  std::exception_ptr exception_;
  std::vector<unsigned char> shared_;
  std::vector<SharedVar> shared_vars_;
  std::size_t shared_used_ = 0;
};

void thread_main() {
  active->thread_body();
}

Grid& running(const char* what) {
  TORCH_CHECK(active != nullptr, "cuda_emu: ", what, " called outside a kernel");
  return *active;
}

bool valid_launch(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 && block.z >= 1 && block.z <= 64 &&
         threads <= kMaxBlockThreads;
}

// The seed of a launch's order: from CUDA_EMU_SEED and the launch's line, so that rerunning one test reproduces it.
std::optional<uint64_t> launch_seed(const Site& site) {
  const char* env = std::getenv("CUDA_EMU_SEED");
  if (env == nullptr || *env == '\0') {
    return std::nullopt;
  }
  return std::strtoull(env, nullptr, 10) * 0x9e3779b97f4a7c15ull + site.line();
}

}  // namespace

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site) {
  return running(op_name(op)).warp_collective(op, mask, value, arg, width, site);
}

void* shared_alloc(int id, std::size_t size, std::size_t align, Site site) {
  return running("__shared__").shared_alloc(id, size, align, site);
}

void run_grid(dim3 grid, dim3 block, std::size_t dynamic_shared, void (*body)(void*), void* call, Site site) {
  TORCH_CHECK(active == nullptr, "cuda_emu: kernel launched from a kernel at ", where(site));
  static std::mutex one_launch_at_a_time;  // the launches share detail::thread_idx and friends
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  TORCH_CHECK(dynamic_shared == 0, "cuda_emu: dynamic shared memory is not emulated (launch at ", where(site), ")");
  if (!valid_launch(grid, block)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  Grid g(grid, block, body, call, site, launch_seed(site));
  detail::grid_dim = grid;
  detail::block_dim = block;
  active = &g;
  try {
    g.run();
  } catch (...) {
    active = nullptr;
    throw;
  }
  active = nullptr;
}

void check_last_error(const char* file, int line) {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "CUDA error: ", cudaGetErrorString(error), " (launch checked at ", file, ":", line,
              ")");
}

}  // namespace cuda_emu

cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

void __syncthreads(cuda_emu::Site site) {
  cuda_emu::running("__syncthreads").syncthreads(site);
}
