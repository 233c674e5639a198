// The CPU execution layer: see runtime.h. One Worker per OS thread runs whole blocks; inside a
// block every CUDA thread is a fiber (ucontext) that runs until it reaches a barrier, a warp
// collective or its end, and the scheduler then completes whatever every participant reached.
#include "sim/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define GF_SIM_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define GF_SIM_ASAN 0
#endif

namespace gf::sim {
namespace {

struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_barriers{0}, g_collectives{0}, g_cp_async{0};

enum class St : uint8_t { kRunnable, kAtWarp, kAtBarrier, kDone };

struct AsyncCopy {
  uint32_t dst;
  const unsigned char* src;
  int size;
  int src_size;
};

struct Fiber {
  ThreadView view{};
  St state = St::kRunnable;
  ucontext_t ctx{};
  char* stack = nullptr;
  size_t stack_size = 0;
  bool abandoned = false;    // left suspended by a failed block: its stack needs cleaning (ASan)
  // The warp collective or barrier this thread waits at.
  const char* op = nullptr;
  unsigned mask = 0;
  ResolveFn resolve = nullptr;
  const void* in = nullptr;
  void* out = nullptr;
  Site site{};
  // cp.async: issued, not yet completed copies (oldest first); committed groups as numbers of
  // copies (oldest first); copies issued since the last commit.
  std::vector<AsyncCopy> copies;
  std::vector<int> groups;
  int uncommitted = 0;
  void* fake_stack = nullptr;
};

// Per shared-memory byte. All fields -1 (0xFF bytes) at block start.
struct Shadow {
  int32_t writer;            // thread that last wrote the byte, -1: never written
  int32_t reader;            // thread that read it since, -2: several, -1: none
  int32_t pending;           // thread whose cp.async owns it until its wait_group, -1: none
  int32_t r_warp;            // warp of all readers, -2: several warps
  uint32_t w_epoch, w_wepoch, r_epoch, r_wepoch;
};

constexpr unsigned kFullMask = 0xffffffffu;

struct Worker;
thread_local Worker* t_worker = nullptr;

std::string base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string where(const Site& s) {
  return base_name(s.file_name()) + ":" + std::to_string(s.line());
}

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

struct Worker {
  const LaunchConfig* cfg = nullptr;
  const std::function<void()>* body = nullptr;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  char* stack_mem = nullptr;
  size_t stack_bytes = 0;    // per fiber, guard page included
  size_t map_bytes = 0;
  std::vector<unsigned char> smem;
  std::vector<Shadow> shadow;
  uint32_t epoch = 0;        // block barriers completed
  std::vector<uint32_t> warp_epoch;  // sync_warp completions per warp
  ucontext_t sched{};
  Fiber* current = nullptr;
  std::string error;
  std::mt19937_64 rng;
  uint3 block_idx{};
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  bool check_races = true;

  Worker(const LaunchConfig& c, const std::function<void()>& b) : cfg(&c), body(&b) {
    nthreads = int(c.block.x * c.block.y * c.block.z);
    fibers.resize(nthreads);
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t usable = GF_SIM_ASAN ? (512u << 10) : (128u << 10);
    stack_bytes = usable + page;
    map_bytes = stack_bytes * size_t(nthreads);
    void* mem = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("CUDA sim: cannot map fiber stacks");
    stack_mem = static_cast<char*>(mem);
    for (int i = 0; i < nthreads; ++i) {
      char* base = stack_mem + size_t(i) * stack_bytes;
      mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting
      fibers[i].stack = base + page;
      fibers[i].stack_size = usable;
    }
    smem.resize(c.smem);
    shadow.resize(c.smem);
    warp_epoch.resize((nthreads + 31) / 32);
    check_races = settings().check_races;
  }
  ~Worker() {
#if GF_SIM_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stack_mem, map_bytes);
#endif
    munmap(stack_mem, map_bytes);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  std::string thread_str(int linear) const {
    const dim3 b = cfg->block;
    uint3 t{unsigned(linear) % b.x, (unsigned(linear) / b.x) % b.y, unsigned(linear) / (b.x * b.y)};
    return dim_str(t);
  }
};

[[noreturn]] void kernel_error(const std::string& what, const Site* site, int thread = -1) {
  Worker* w = t_worker;
  std::ostringstream m;
  m << "CUDA sim";
  if (w) m << " (" << w->cfg->name << ")";
  m << ": " << what;
  if (site) m << " at " << where(*site);
  if (w) {
    m << " [block " << dim_str(w->block_idx);
    if (thread < 0 && w->current) thread = w->current->view.linear;
    if (thread >= 0) m << ", thread " << w->thread_str(thread);
    m << "]";
  }
  throw KernelError(m.str());
}

Worker& worker_or_fail(const char* what) {
  Worker* w = t_worker;
  if (!w || !w->current) throw std::runtime_error(std::string("CUDA sim: ") + what +
                                                  " called outside a running kernel");
  return *w;
}

void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
#if GF_SIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
  swapcontext(&w.sched, &f.ctx);
#if GF_SIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

void yield_to_scheduler(Worker& w, Fiber& f, bool finished) {
#if GF_SIM_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, w.sched_stack_bottom,
                                 w.sched_stack_size);
#else
  (void)finished;
#endif
  swapcontext(&f.ctx, &w.sched);
#if GF_SIM_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main(unsigned lo, unsigned hi) {
  Worker* w = reinterpret_cast<Worker*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  Fiber* f = w->current;
#if GF_SIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
  try {
    (*w->body)();
    if (!f->copies.empty())
      kernel_error("the thread exited with " + std::to_string(f->copies.size()) +
                   " cp.async copies never completed by a cp_async_wait", nullptr);
  } catch (const KernelError& e) {
    if (w->error.empty()) w->error = e.what();
  } catch (const std::exception& e) {
    if (w->error.empty()) w->error = std::string("CUDA sim: exception in kernel: ") + e.what();
  } catch (...) {
    if (w->error.empty()) w->error = "CUDA sim: unknown exception in kernel";
  }
  f->state = St::kDone;
  yield_to_scheduler(*w, *f, /*finished=*/true);
  __builtin_unreachable();
}

void make_order(std::vector<int>& order, Order policy, std::mt19937_64& rng) {
  std::iota(order.begin(), order.end(), 0);
  if (policy == Order::kReverse) std::reverse(order.begin(), order.end());
  if (policy == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
}

bool same_site(const Site& a, const Site& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Completes the warp collectives and the barrier every participant has reached. Returns whether
// any thread became runnable; throws KernelError for a rule the hardware would break on.
bool resolve(Worker& w) {
  bool progress = false;
  const int n = w.nthreads;
  for (int base = 0; base < n; base += 32) {
    const int lanes = std::min(32, n - base);
    int at_warp = 0, done = 0, at_bar = 0, first_warp = -1, first_other = -1;
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = w.fibers[base + l];
      if (f.state == St::kAtWarp) {
        ++at_warp;
        if (first_warp < 0) first_warp = base + l;
      } else {
        if (f.state == St::kDone) ++done;
        if (f.state == St::kAtBarrier) ++at_bar;
        if (first_other < 0) first_other = base + l;
      }
    }
    if (at_warp == 0) continue;
    const Fiber& a = w.fibers[first_warp];
    if (lanes < 32)
      kernel_error(std::string(a.op) + " in a warp of " + std::to_string(lanes) +
                   " threads: warp collectives need all 32 lanes (make the block size a multiple "
                   "of 32)", &a.site, first_warp);
    if (at_warp < 32) {
      const Fiber& o = w.fibers[first_other];
      if (o.state == St::kRunnable) continue;  // cannot happen after a full round; be safe
      std::string other = o.state == St::kDone ? "has exited"
                                               : "waits at the block barrier at " + where(o.site);
      kernel_error("lane " + std::to_string(first_warp - base) + " waits at " + a.op + " (" +
                   where(a.site) + ") while lane " + std::to_string(first_other - base) + " " +
                   other + ": all 32 lanes must reach the same warp collective", nullptr,
                   first_warp);
    }
    for (int l = 1; l < 32; ++l) {
      const Fiber& b = w.fibers[base + l];
      if (b.resolve != a.resolve || !same_site(a.site, b.site) || std::strcmp(a.op, b.op) != 0)
        kernel_error("lanes of one warp at different collectives: lane 0 at " + std::string(a.op) +
                     " (" + where(a.site) + "), lane " + std::to_string(l) + " at " + b.op + " (" +
                     where(b.site) + ")", nullptr, base);
      if (b.mask != a.mask)
        kernel_error(std::string(a.op) + " with different masks in one warp", &a.site, base + l);
    }
    if (a.mask != kFullMask)
      kernel_error(std::string(a.op) + " with mask " + std::to_string(a.mask) +
                   ": only full-warp collectives are supported", &a.site, first_warp);
    Lane io[32];
    for (int l = 0; l < 32; ++l) {
      Fiber& f = w.fibers[base + l];
      io[l] = Lane{f.in, f.out, base + l};
    }
    a.resolve(io);
    for (int l = 0; l < 32; ++l) w.fibers[base + l].state = St::kRunnable;
    g_collectives.fetch_add(1, std::memory_order_relaxed);
    progress = true;
  }

  int at_bar = 0, done = 0, first_bar = -1, first_done = -1;
  for (int i = 0; i < n; ++i) {
    const St s = w.fibers[i].state;
    if (s == St::kAtBarrier) {
      ++at_bar;
      if (first_bar < 0) first_bar = i;
    } else if (s == St::kDone) {
      ++done;
      if (first_done < 0) first_done = i;
    }
  }
  if (at_bar > 0 && at_bar + done == n) {
    const Fiber& a = w.fibers[first_bar];
    if (done > 0)
      kernel_error("thread " + w.thread_str(first_done) +
                   " exited without reaching the block barrier other threads wait at (" +
                   where(a.site) + "): a thread skipped sync_block", nullptr, first_done);
    for (int i = 0; i < n; ++i)
      if (!same_site(w.fibers[i].site, a.site))
        kernel_error("threads wait at different block barriers: " + where(a.site) + " and " +
                     where(w.fibers[i].site) + " (thread " + w.thread_str(i) + ")", nullptr,
                     first_bar);
    ++w.epoch;
    for (auto& f : w.fibers) f.state = St::kRunnable;
    g_barriers.fetch_add(1, std::memory_order_relaxed);
    progress = true;
  }
  return progress;
}

void run_block(Worker& w, uint3 block_idx, uint64_t block_linear) {
  const LaunchConfig& c = *w.cfg;
  const Settings& s = settings();
  w.block_idx = block_idx;
  w.rng.seed(s.seed * 0x9E3779B97F4A7C15ull + block_linear + 1);
  w.epoch = 0;
  std::fill(w.warp_epoch.begin(), w.warp_epoch.end(), 0u);
  // Uninitialized shared memory is NaN for every float type; the shadow says "never written".
  if (!w.smem.empty()) {  // (memset of a null pointer is undefined even for 0 bytes)
    std::memset(w.smem.data(), 0xFF, w.smem.size());
    if (w.check_races)
      std::memset(static_cast<void*>(w.shadow.data()), 0xFF, w.shadow.size() * sizeof(Shadow));
  }
  const uintptr_t self = reinterpret_cast<uintptr_t>(&w);
  for (int i = 0; i < w.nthreads; ++i) {
    Fiber& f = w.fibers[i];
#if GF_SIM_ASAN
    if (f.abandoned) ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
    f.abandoned = false;
    f.state = St::kRunnable;
    f.copies.clear();
    f.groups.clear();
    f.uncommitted = 0;
    f.fake_stack = nullptr;
    f.site = Site{};
    f.view.thread_idx = uint3{unsigned(i) % c.block.x, (unsigned(i) / c.block.x) % c.block.y,
                              unsigned(i) / (c.block.x * c.block.y)};
    f.view.block_idx = block_idx;
    f.view.block_dim = c.block;
    f.view.grid_dim = c.grid;
    f.view.linear = i;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stack_size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 2, unsigned(self & 0xffffffffu),
                unsigned(self >> 32));
  }
  std::vector<int> order(w.nthreads);
  for (;;) {
    make_order(order, s.thread_order, w.rng);
    bool ran = false;
    for (int i : order) {
      Fiber& f = w.fibers[i];
      if (f.state != St::kRunnable) continue;
      ran = true;
      switch_to_fiber(w, f);
      if (!w.error.empty()) break;
    }
    bool all_done = std::all_of(w.fibers.begin(), w.fibers.end(),
                                [](const Fiber& f) { return f.state == St::kDone; });
    if (!w.error.empty() || all_done) break;
    bool progress = false;
    try {
      progress = resolve(w);
    } catch (const KernelError& e) {
      w.error = e.what();
    }
    if (!w.error.empty()) break;
    if (!ran && !progress) {
      w.error = "CUDA sim (" + std::string(c.name) + "): threads wait forever in block " +
                dim_str(block_idx);
      break;
    }
  }
  if (!w.error.empty())
    for (auto& f : w.fibers)
      if (f.state != St::kDone) f.abandoned = true;
  g_blocks.fetch_add(1, std::memory_order_relaxed);
}

// ---- shared-memory tracking -----------------------------------------------------------------

void check_bounds(const Worker& w, uint32_t off, uint32_t bytes, const char* what, int thread) {
  if (uint64_t(off) + bytes > w.smem.size())
    kernel_error(std::string(what) + ": shared-memory access [" + std::to_string(off) + ", " +
                 std::to_string(uint64_t(off) + bytes) + ") beyond the block's " +
                 std::to_string(w.smem.size()) + " bytes", nullptr, thread);
}

// Is an access by `other` at (epoch, warp epoch) ordered before an access by `me` now?
bool ordered(const Worker& w, int other, uint32_t o_epoch, uint32_t o_wepoch, int me) {
  if (other == me) return true;
  if (o_epoch != w.epoch) return true;  // a block barrier completed since
  const int warp = me / 32;
  return other / 32 == warp && o_wepoch != w.warp_epoch[warp];  // a sync_warp since
}

void access(Worker& w, int me, uint32_t off, uint32_t bytes, bool write, const char* what) {
  check_bounds(w, off, bytes, what, me);
  if (!w.check_races) return;
  const int warp = me / 32;
  const uint32_t wep = w.warp_epoch[warp];
  for (uint32_t i = off; i < off + bytes; ++i) {
    Shadow& s = w.shadow[i];
    auto race = [&](const std::string& kind, int other) {
      kernel_error(std::string(what) + ": shared-memory " + kind + " race on byte " +
                   std::to_string(i) + " with thread " +
                   (other >= 0 ? w.thread_str(other) : std::string("(several)")) +
                   " and no barrier in between", nullptr, me);
    };
    if (s.pending >= 0) {
      kernel_error(std::string(what) + ": byte " + std::to_string(i) +
                   " of shared memory is the destination of a cp.async of thread " +
                   w.thread_str(s.pending) + " not yet completed by its cp_async_wait", nullptr,
                   me);
    }
    if (write) {
      if (s.writer >= 0 && !ordered(w, s.writer, s.w_epoch, s.w_wepoch, me)) race("write-write", s.writer);
      if (s.reader != -1 && s.r_epoch == w.epoch && s.reader != me) {
        const bool warp_ordered = s.r_warp == warp && s.r_wepoch != wep;
        if (!warp_ordered) race("read-write", s.reader);
      }
      s.writer = me;
      s.w_epoch = w.epoch;
      s.w_wepoch = wep;
      s.reader = -1;
    } else {
      if (s.writer == -1)
        kernel_error(std::string(what) + ": reads byte " + std::to_string(i) +
                     " of shared memory, never written since the block started", nullptr, me);
      if (!ordered(w, s.writer, s.w_epoch, s.w_wepoch, me)) race("write-read", s.writer);
      if (s.reader == -1 || s.r_epoch != w.epoch) {
        s.reader = me;
        s.r_warp = warp;
        s.r_epoch = w.epoch;
        s.r_wepoch = wep;
      } else if (s.reader != me) {
        s.reader = -2;
        if (s.r_warp != warp) s.r_warp = -2;
        s.r_wepoch = std::max(s.r_wepoch, wep);
      } else {
        s.r_wepoch = wep;
      }
    }
  }
}

}  // namespace

// ---- public API -------------------------------------------------------------------------------

Settings& settings() {
  static Settings s;
  return s;
}

Stats stats() {
  Stats s;
  s.launches = g_launches.load();
  s.blocks = g_blocks.load();
  s.barriers = g_barriers.load();
  s.collectives = g_collectives.load();
  s.cp_async = g_cp_async.load();
  return s;
}

void reset_stats() {
  g_launches = 0;
  g_blocks = 0;
  g_barriers = 0;
  g_collectives = 0;
  g_cp_async = 0;
}

const ThreadView& view() { return worker_or_fail("threadIdx/blockIdx").current->view; }

[[noreturn]] void fail(const std::string& what, Site site) { kernel_error(what, &site); }

// Also called from resolve functions (on the scheduler, between fibers): a worker suffices.
Worker& worker_any(const char* what) {
  if (!t_worker) throw std::runtime_error(std::string("CUDA sim: ") + what + " outside a kernel");
  return *t_worker;
}
unsigned char* smem_base() { return worker_any("shared memory").smem.data(); }
size_t smem_size() { return worker_any("shared memory").smem.size(); }

void smem_read(uint32_t off, uint32_t bytes, const char* what) {
  Worker& w = worker_or_fail(what);
  access(w, w.current->view.linear, off, bytes, false, what);
}

void smem_write(uint32_t off, uint32_t bytes, const char* what) {
  Worker& w = worker_or_fail(what);
  access(w, w.current->view.linear, off, bytes, true, what);
}

void smem_read_by(int thread, uint32_t off, uint32_t bytes, const char* what) {
  Worker* w = t_worker;
  if (!w) throw std::runtime_error("CUDA sim: shared memory read outside a kernel");
  access(*w, thread, off, bytes, false, what);
}

void barrier(Site site) {
  Worker& w = worker_or_fail("sync_block");
  Fiber& f = *w.current;
  f.site = site;
  f.state = St::kAtBarrier;
  yield_to_scheduler(w, f, false);
}

void warp_collective(const char* op, unsigned mask, ResolveFn resolve_fn, const void* in,
                     void* out, Site site) {
  Worker& w = worker_or_fail(op);
  Fiber& f = *w.current;
  f.op = op;
  f.mask = mask;
  f.resolve = resolve_fn;
  f.in = in;
  f.out = out;
  f.site = site;
  f.state = St::kAtWarp;
  yield_to_scheduler(w, f, false);
}

void warp_synced(int warp) {
  Worker* w = t_worker;
  if (!w) throw std::runtime_error("CUDA sim: sync_warp outside a kernel");
  ++w->warp_epoch[size_t(warp)];
}

void cp_async(uint32_t dst_off, const void* src, int cp_size, int src_size, Site site) {
  Worker& w = worker_or_fail("cp_async");
  Fiber& f = *w.current;
  const int me = f.view.linear;
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    kernel_error("cp.async size " + std::to_string(cp_size) + " (4, 8 or 16)", &site);
  if (src_size < 0 || src_size > cp_size)
    kernel_error("cp.async src-size " + std::to_string(src_size) + " outside [0, " +
                 std::to_string(cp_size) + "]", &site);
  if (dst_off % unsigned(cp_size) != 0)
    kernel_error("cp.async destination (shared offset " + std::to_string(dst_off) +
                 ") not aligned to its " + std::to_string(cp_size) + " bytes", &site);
  if (reinterpret_cast<uintptr_t>(src) % uintptr_t(cp_size) != 0)
    kernel_error("cp.async source address not aligned to its " + std::to_string(cp_size) +
                 " bytes", &site);
  // The destination is written by this thread, later: check it as a write now (another thread's
  // unordered access is a race whatever the completion time), then poison it until the wait.
  access(w, me, dst_off, uint32_t(cp_size), true, "cp_async");
  if (w.check_races)
    for (int i = 0; i < cp_size; ++i) w.shadow[dst_off + i].pending = me;
  std::memset(w.smem.data() + dst_off, 0xFF, size_t(cp_size));
  f.copies.push_back(AsyncCopy{dst_off, static_cast<const unsigned char*>(src), cp_size, src_size});
  ++f.uncommitted;
  g_cp_async.fetch_add(1, std::memory_order_relaxed);
}

void cp_async_commit(Site) {
  Worker& w = worker_or_fail("cp_async_commit");
  Fiber& f = *w.current;
  f.groups.push_back(f.uncommitted);
  f.uncommitted = 0;
}

void cp_async_wait(int pending_groups, Site site) {
  Worker& w = worker_or_fail("cp_async_wait");
  Fiber& f = *w.current;
  const int me = f.view.linear;
  if (pending_groups < 0) kernel_error("cp_async_wait with a negative group count", &site);
  while (int(f.groups.size()) > pending_groups) {
    const int count = f.groups.front();
    f.groups.erase(f.groups.begin());
    for (int k = 0; k < count; ++k) {
      const AsyncCopy c = f.copies.front();
      f.copies.erase(f.copies.begin());
      unsigned char* dst = w.smem.data() + c.dst;
      if (c.src_size > 0) std::memcpy(dst, c.src, size_t(c.src_size));
      if (c.size > c.src_size) std::memset(dst + c.src_size, 0, size_t(c.size - c.src_size));  // zero-fill
      if (w.check_races)
        for (int i = 0; i < c.size; ++i) w.shadow[c.dst + i].pending = -1;
      access(w, me, c.dst, uint32_t(c.size), true, "cp_async_wait");
    }
  }
}

DeviceInfo device_info() {
  const Settings& s = settings();
  DeviceInfo d;
  d.arch = s.arch;
  d.num_sms = s.num_sms;
  d.smem_optin = max_smem_optin(s.arch);
  return d;
}

void launch(const LaunchConfig& c, const DeviceInfo& dev, const std::function<void()>& body) {
  check_launch(c, dev);
  if (t_worker) throw std::runtime_error("CUDA sim: a kernel launch from inside a kernel");
  g_launches.fetch_add(1, std::memory_order_relaxed);
  const Settings& s = settings();
  const uint64_t nblocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  if (nblocks > (uint64_t(1) << 24))
    throw std::invalid_argument(std::string("CUDA sim: launch of ") + c.name + " with " +
                                std::to_string(nblocks) + " blocks: too many for the CPU layer");
  std::vector<uint32_t> order(nblocks);
  std::iota(order.begin(), order.end(), 0u);
  if (s.block_order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (s.block_order == Order::kRandom) {
    std::mt19937_64 rng(s.seed * 0xD1B54A32D192ED03ull + 7);
    std::shuffle(order.begin(), order.end(), rng);
  }
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::string first_error;

  auto work = [&]() {
    try {
      Worker w(c, body);
      t_worker = &w;
      for (;;) {
        if (stop.load()) break;
        const uint64_t i = next.fetch_add(1);
        if (i >= nblocks) break;
        const uint32_t b = order[i];
        const uint3 idx{b % c.grid.x, (b / c.grid.x) % c.grid.y, b / (c.grid.x * c.grid.y)};
        run_block(w, idx, b);
        if (!w.error.empty()) {
          std::lock_guard<std::mutex> lock(mu);
          if (first_error.empty()) first_error = w.error;
          stop = true;
          break;
        }
      }
      t_worker = nullptr;
    } catch (const std::exception& e) {
      t_worker = nullptr;
      std::lock_guard<std::mutex> lock(mu);
      if (first_error.empty()) first_error = e.what();
      stop = true;
    }
  };
  const int nworkers = int(std::max<uint64_t>(1, std::min<uint64_t>(uint64_t(std::max(1, s.workers)), nblocks)));
  if (nworkers == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < nworkers; ++i) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  if (!first_error.empty()) throw std::runtime_error(first_error);
}

}  // namespace gf::sim
