// The CPU warp emulator: runs a CUDA C kernel of the course on the CPU, one thread block at a time.
//
// A GPU thread here is a fiber (a stack of its own, entered with ucontext and switched with _setjmp/_longjmp,
// which skip the signal-mask system calls of swapcontext) in one OS thread. A fiber
// runs until it must wait for others: at __syncthreads() for its block, at a warp-wide instruction (a shuffle, a
// vote, ldmatrix, mma.sync, WMMA in mma.h) for the other lanes of its warp. When every lane of a warp has arrived,
// each lane takes what the instruction hands it, computed here from the PTX ISA's description of that instruction.
// So the kernel's own source runs unchanged, every index it computes is followed, and what it hands the tensor
// cores is what it would hand them on a GPU. Not modelled: wgmma, TMA, clusters, and anything of sm_90a.
//
// What the emulator checks on the way, and reports as an error naming the block and thread:
//   * shared-memory addresses (cp.async, ldmatrix) inside the block's dynamic shared memory, 16-byte aligned;
//   * cp.async sources inside one of the arrays passed to the kernel, 16-byte aligned;
//   * threads that wait at different kinds of barrier (a deadlock on a GPU), lanes of a warp at different
//     warp-wide instructions, a lane that left while its warp waits for it, a mask that leaves lanes out;
//   * a thread that exits with cp.async copies not yet waited for.
// Copies land as late as the rules allow, when cp.async.wait_group is reached: a kernel that reads a tile before
// waiting for it reads the 0xff bytes (NaN in fp16 and bf16) the emulator fills dynamic shared memory with at the
// start of every block. With copies_at_issue they land at once instead: the other extreme, the one that shows a
// stage refilled before every warp is done with it. Run a pipelined kernel both ways.
//
// What it does not model: timing, and anything else of the hardware's concurrency. Between two waits a fiber
// runs alone, so a race that depends on interleaving goes unseen, and a thread that spins on a flag another
// thread sets never lets that thread run: it hangs (an isolated launch is stopped at its time limit). Static
// __shared__ arrays are per kernel (blocks run one at a time) and work for loads and stores, but are not filled
// with 0xff and have no shared address: ldmatrix and cp.async take extern __shared__ (dynamic) memory only.
// mma.sync sums its products in double and rounds once to float: closer to exact than the tensor cores, which
// keep fewer bits in an unspecified order, so results may differ from a GPU's in the last bits.
#pragma once

#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS declares ucontext only for XSI programs (untested there)
#endif
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---- CUDA C's words, on the CPU ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // GNU syntax: it may stand among the specifiers
#define __shared__ static  // static shared arrays: one per kernel, and blocks run one at a time

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// The vector types the course's kernels load and store with (16 bytes: one instruction on a GPU).
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};

using std::max;
using std::min;

namespace course_emulator {

constexpr int WARP_SIZE = 32;
constexpr int SLOT_BYTES = 128;          // what one lane hands a warp-wide instruction (wmma: its A and B)
constexpr std::size_t STACK_BYTES = 256 * 1024;

struct Copy {  // one cp.async: 16 bytes to shared memory from `source`, or 16 zero bytes
    unsigned destination;
    const void* source;
    bool inside;
};

struct Thread {
    ucontext_t context;  // its first entry, onto its own stack
    std::jmp_buf resume;  // where it waits, once started
    bool started = false;
    uint3 index;
    int warp = 0, lane = 0;
    bool done = false, waiting = false;
    const char* waiting_at = "";
    unsigned collectives = 0;  // warp-wide instructions passed: picks the half of the warp's slots to use
    std::vector<Copy> open_group;
    std::vector<std::vector<Copy>> committed;
};

struct Barrier {
    int arrived = 0;
    const char* what = nullptr;
    std::vector<Thread*> waiting;
};

struct Buffer {
    const unsigned char* start;
    std::size_t bytes;
};

// Everything about the launch in progress. The kernel's code reaches it through `active`.
struct Launch {
    dim3 grid, block;
    uint3 block_index{0, 0, 0};
    unsigned char* shared = nullptr;
    std::size_t shared_bytes = 0;
    std::vector<Buffer> buffers;
    bool copies_at_issue = false;
    std::vector<Thread> threads;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned char> slots;  // [warp][2][lane][SLOT_BYTES]
    int live = 0;
    std::jmp_buf scheduler;  // where a fiber goes back to when it waits, fails or ends
    Thread* current = nullptr;
    std::function<void()> body;
    std::string error;

    int threads_per_block() const { return static_cast<int>(block.x * block.y * block.z); }
    int lanes_of(int warp) const { return std::min(WARP_SIZE, threads_per_block() - warp * WARP_SIZE); }
    unsigned char* slot(int warp, unsigned parity, int lane) {
        return slots.data() + ((static_cast<std::size_t>(warp) * 2 + parity) * WARP_SIZE + lane) * SLOT_BYTES;
    }
};
inline Launch* active = nullptr;

// Fiber stacks, kept from launch to launch: mapped once, never filled (the OS commits the pages a fiber touches,
// a few KiB each), each above a page that may not be touched, so an overflow stops the process (SIGSEGV) instead
// of silently overwriting the next fiber's stack.
inline char* stack_of(int thread) {
    static std::vector<char*> stacks;
    static const std::size_t guard = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    while (static_cast<int>(stacks.size()) <= thread) {
        void* mapping = mmap(nullptr, STACK_BYTES + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapping == MAP_FAILED) std::abort();
        mprotect(mapping, guard, PROT_NONE);  // stacks grow down, toward this page
        stacks.push_back(static_cast<char*>(mapping) + guard);
    }
    return stacks[thread];
}

inline std::string where() {
    const Launch& l = *active;
    char text[160];
    std::snprintf(text, sizeof text, "block (%u, %u, %u), thread (%u, %u, %u)", l.block_index.x, l.block_index.y,
                  l.block_index.z, l.current->index.x, l.current->index.y, l.current->index.z);
    return text;
}

// Stop the launch: record what went wrong and leave this fiber for good (nothing after a failure runs).
[[noreturn]] inline void fail(const std::string& what) {
    if (active->error.empty()) active->error = where() + ": " + what;
    _longjmp(active->scheduler, 1);  // never resumed
}

inline void arrive(Barrier& barrier, int expected, const char* what) {
    if (barrier.arrived == 0) {
        barrier.what = what;
    } else if (std::strcmp(barrier.what, what) != 0) {
        fail(std::string("reached ") + what + " while others it must meet wait at " + barrier.what +
             " (on a GPU: a hang, or garbage)");
    }
    if (++barrier.arrived == expected) {  // the last one in releases everyone
        for (Thread* t : barrier.waiting) t->waiting = false;
        barrier.waiting.clear();
        barrier.arrived = 0;
        return;
    }
    Thread* me = active->current;
    me->waiting = true;
    me->waiting_at = what;
    barrier.waiting.push_back(me);
    if (_setjmp(me->resume) == 0) _longjmp(active->scheduler, 1);  // back here once released
}

// ---- warp-wide instructions: every lane hands in a value, every lane sees all of them ------------------------
template <typename In>
std::array<In, WARP_SIZE> warp_exchange(const char* what, const In& mine) {
    static_assert(sizeof(In) <= SLOT_BYTES && std::is_trivially_copyable_v<In>, "a lane's part fits its slot");
    Launch& l = *active;
    Thread& me = *l.current;
    // Two sets of slots, used in turn: a lane can only write a set again after every lane has arrived at the
    // next instruction, that is after every lane has read this one.
    const unsigned parity = me.collectives++ & 1u;
    std::memcpy(l.slot(me.warp, parity, me.lane), &mine, sizeof(In));
    arrive(l.warp_barriers[me.warp], l.lanes_of(me.warp), what);
    std::array<In, WARP_SIZE> all{};
    for (int lane = 0; lane < l.lanes_of(me.warp); ++lane) std::memcpy(&all[lane], l.slot(me.warp, parity, lane), sizeof(In));
    return all;
}

inline void require_full_mask(unsigned mask, const char* what) {
    const int lanes = active->lanes_of(active->current->warp);
    const unsigned full = lanes == WARP_SIZE ? 0xffffffffu : (1u << lanes) - 1u;
    if ((mask & full) != full) fail(std::string(what) + ": the emulator takes only masks naming every lane of the warp");
}

// ---- shared memory -----------------------------------------------------------------------------------------------
inline unsigned char* dynamic_shared() { return active->shared; }

inline unsigned shared_offset(const void* p) {
    const auto* byte = static_cast<const unsigned char*>(p);
    if (byte < active->shared || byte > active->shared + active->shared_bytes)
        fail("a shared address was asked for memory outside the block's dynamic shared memory (the emulator gives "
             "shared addresses to extern __shared__ memory only, not to static __shared__ arrays)");
    return static_cast<unsigned>(byte - active->shared);
}

inline unsigned char* shared_at(unsigned offset, unsigned bytes, unsigned alignment, const char* what) {
    if (offset % alignment != 0 || offset + bytes > active->shared_bytes) {
        char text[200];
        std::snprintf(text, sizeof text, "%s at shared byte %u (%u bytes) is %s the block's %zu bytes", what, offset,
                      bytes, offset % alignment ? "misaligned in" : "past", active->shared_bytes);
        fail(text);
    }
    return active->shared + offset;
}

// ---- cp.async: copies queued per thread, landing at cp.async.wait_group (or at once) ---------------------------
inline void land(const Copy& copy) {
    unsigned char* to = active->shared + copy.destination;
    if (copy.inside) {
        std::memcpy(to, copy.source, 16);
    } else {
        std::memset(to, 0, 16);
    }
}

inline void check_source(const void* source) {
    const auto* byte = static_cast<const unsigned char*>(source);
    if (reinterpret_cast<std::uintptr_t>(byte) % 16 != 0) fail("cp.async reads a global address not 16-byte aligned");
    for (const Buffer& b : active->buffers)
        if (byte >= b.start && byte + 16 <= b.start + b.bytes) return;
    fail("cp.async reads 16 bytes outside every array passed to the kernel");
}

inline void cp_async_16(unsigned destination, const void* source, bool inside) {
    shared_at(destination, 16, 16, "cp.async's destination");
    if (inside) check_source(source);
    const Copy copy{destination, source, inside};
    if (active->copies_at_issue) {
        land(copy);
    } else {
        active->current->open_group.push_back(copy);
    }
}

inline void cp_async_commit() {
    Thread& me = *active->current;
    me.committed.push_back(std::move(me.open_group));
    me.open_group.clear();
}

template <int PENDING>
void cp_async_wait() {
    Thread& me = *active->current;
    while (me.committed.size() > static_cast<std::size_t>(PENDING)) {
        for (const Copy& copy : me.committed.front()) land(copy);
        me.committed.erase(me.committed.begin());
    }
}

// ---- ldmatrix: four 8x8 tiles of 16-bit values; lane i gives the address of row i % 8 of tile i / 8 --------------
// Lane l receives, of each tile, row l / 4 and columns 2 (l % 4), 2 (l % 4) + 1 (with .trans: of the transpose).
inline void ldmatrix(unsigned (&r)[4], unsigned address, bool transpose) {
    shared_at(address, 16, 16, "this lane's ldmatrix row address");  // checked by the lane that gives it
    const auto rows = warp_exchange<unsigned>(transpose ? "ldmatrix.trans" : "ldmatrix", address);
    const int lane = active->current->lane, group = lane / 4, pair = lane % 4;
    for (int tile = 0; tile < 4; ++tile) {
        auto element = [&](int row, int column) {  // 16 bits of row `row`, column `column` of the tile
            unsigned short bits;
            std::memcpy(&bits, shared_at(rows[8 * tile + row], 16, 16, "an ldmatrix row") + 2 * column, 2);
            return static_cast<unsigned>(bits);
        };
        r[tile] = transpose ? element(2 * pair, group) | element(2 * pair + 1, group) << 16
                            : element(group, 2 * pair) | element(group, 2 * pair + 1) << 16;
    }
    // One instruction reads for the whole warp: no lane may go on (and store into the tile) before all have read.
    warp_exchange<int>("ldmatrix (all lanes have read)", 0);
}
inline void ldmatrix_x4(unsigned (&r)[4], unsigned address) { ldmatrix(r, address, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) { ldmatrix(r, address, true); }

// ---- mma.sync.m16n8k16.row.col, fp32 accumulators: D[16x8] += A[16x16] B[16x8] ------------------------------
// Lane l = 4 g + t holds, two 16-bit values per register: a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..2t+1),
// a[2] = A(g, 2t+8..2t+9), a[3] = A(g+8, 2t+8..2t+9); b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g); and
// d[0], d[1] = D(g, 2t..2t+1), d[2], d[3] = D(g+8, 2t..2t+1).
template <typename T>
float element_value(unsigned reg, int half) {
    const auto bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
    if constexpr (std::is_same_v<T, __half>) {
        return half_value(bits);
    } else {
        static_assert(std::is_same_v<T, __nv_bfloat16>, "mma.sync m16n8k16 takes fp16 or bf16");
        return bfloat16_value(bits);
    }
}

template <typename T>
void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    struct Operands {
        unsigned a[4], b[2];
    };
    const auto all = warp_exchange<Operands>("mma.sync", Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}});
    auto a_at = [&](int row, int k) {
        return element_value<T>(all[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2);
    };
    auto b_at = [&](int k, int column) { return element_value<T>(all[column * 4 + (k % 8) / 2].b[k / 8], k % 2); };
    const int lane = active->current->lane;
    for (int e = 0; e < 4; ++e) {
        const int row = lane / 4 + 8 * (e / 2), column = 2 * (lane % 4) + e % 2;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) sum += static_cast<double>(a_at(row, k)) * b_at(k, column);
        d[e] = static_cast<float>(d[e] + sum);
    }
}

// ---- shuffles ------------------------------------------------------------------------------------------------------
template <typename V, typename SourceLane>
V shuffle_from(unsigned mask, V value, SourceLane source_lane, const char* what) {
    require_full_mask(mask, what);
    const auto all = warp_exchange<V>(what, value);
    const int lane = active->current->lane, source = source_lane(lane);
    return source >= 0 && source < active->lanes_of(active->current->warp) ? all[source] : value;
}

// ---- a launch: blocks one after another, each block's threads as fibers ---------------------------------------------
inline void thread_main() {
    Launch& l = *active;
    l.body();
    Thread& me = *l.current;
    std::size_t in_flight = me.open_group.size();  // empty groups (a pipeline's tail) are harmless
    for (const auto& group : me.committed) in_flight += group.size();
    if (in_flight > 0)
        fail("exits with " + std::to_string(in_flight) +
             " cp.async copies not waited for: they may land in the next block's shared memory "
             "(cp_async_wait<0>() before returning)");
    me.done = true;
    --l.live;
    // A thread that leaves no longer counts at __syncthreads(): release the others if it was the last awaited.
    if (l.block_barrier.arrived > 0 && l.block_barrier.arrived == l.live) {
        for (Thread* t : l.block_barrier.waiting) t->waiting = false;
        l.block_barrier.waiting.clear();
        l.block_barrier.arrived = 0;
    }
    _longjmp(l.scheduler, 1);  // a fiber never returns: its stack is reused by the next block's thread
}

// Every thread still running waits, and none will come: say where each run of consecutive threads is.
inline std::string describe_deadlock(const Launch& l) {
    char head[120];
    std::snprintf(head, sizeof head, "deadlock in block (%u, %u, %u), every running thread waiting for others that "
                  "will never come (on a GPU: a hang): ", l.block_index.x, l.block_index.y, l.block_index.z);
    std::string text = head;
    auto state = [&](int i) { return l.threads[i].done ? "exited" : l.threads[i].waiting_at; };
    int runs = 0;
    for (int first = 0, count = l.threads_per_block(); first < count && runs < 12; ++runs) {
        int last = first;
        while (last + 1 < count && std::strcmp(state(last + 1), state(first)) == 0) ++last;
        char line[120];
        std::snprintf(line, sizeof line, "%sthreads %d-%d %s%s", runs ? "; " : "", first, last,
                      l.threads[first].done ? "" : "wait at ", state(first));
        text += line;
        first = last + 1;
    }
    return text + " (threads counted x first, then y and z)";
}

inline bool run_block(Launch& l) {
    const int count = l.threads_per_block();
    std::memset(l.shared, 0xff, l.shared_bytes);  // uninitialised shared memory: NaN in fp16 and bf16
    l.live = count;
    l.block_barrier = Barrier{};
    for (Barrier& b : l.warp_barriers) b = Barrier{};
    for (int i = 0; i < count; ++i) {
        Thread& t = l.threads[i];
        t = Thread{};
        t.index = uint3{i % l.block.x, i / l.block.x % l.block.y, i / (l.block.x * l.block.y)};
        t.warp = i / WARP_SIZE, t.lane = i % WARP_SIZE;
        getcontext(&t.context);
        t.context.uc_stack.ss_sp = stack_of(i);
        t.context.uc_stack.ss_size = STACK_BYTES;
        t.context.uc_link = nullptr;
        makecontext(&t.context, thread_main, 0);
    }
    for (;;) {
        bool ran = false;
        for (Thread& t : l.threads) {
            if (t.done || t.waiting) continue;
            ran = true;
            l.current = &t;
            if (_setjmp(l.scheduler) == 0) {  // run t until it waits, fails or ends: each comes back here
                if (t.started) _longjmp(t.resume, 1);
                t.started = true;
                setcontext(&t.context);
            }
            if (!l.error.empty()) return false;
        }
        if (l.live == 0) return true;
        if (!ran) {
            l.error = describe_deadlock(l);
            return false;
        }
    }
}

// geometry: grid x, y, z, block x, y, z. Returns nullptr, or what went wrong (valid until the next launch).
inline const char* launch(const unsigned* geometry, std::size_t shared_bytes, const void* const* buffer_starts,
                          const std::size_t* buffer_bytes, int buffer_count, bool copies_at_issue,
                          std::function<void()> body) {
    static std::mutex one_at_a_time;  // `active` and the stacks are this library's: two Python threads take turns
    const std::lock_guard<std::mutex> hold(one_at_a_time);
    static std::string last_error;
    Launch l;
    l.grid = dim3{geometry[0], geometry[1], geometry[2]};
    l.block = dim3{geometry[3], geometry[4], geometry[5]};
    l.copies_at_issue = copies_at_issue;
    for (int i = 0; i < buffer_count; ++i)
        l.buffers.push_back(Buffer{static_cast<const unsigned char*>(buffer_starts[i]), buffer_bytes[i]});
    const int count = l.threads_per_block(), warps = (count + WARP_SIZE - 1) / WARP_SIZE;
    l.threads.resize(count);
    l.warp_barriers.resize(warps);
    l.slots.assign(static_cast<std::size_t>(warps) * 2 * WARP_SIZE * SLOT_BYTES, 0);
    l.shared_bytes = shared_bytes;
    l.shared = static_cast<unsigned char*>(std::aligned_alloc(128, (shared_bytes + 127) / 128 * 128 + 128));
    if (l.shared == nullptr) return "the emulator could not allocate the block's shared memory";
    l.body = std::move(body);
    active = &l;
    bool ok = true;
    for (unsigned z = 0; ok && z < l.grid.z; ++z)
        for (unsigned y = 0; ok && y < l.grid.y; ++y)
            for (unsigned x = 0; ok && x < l.grid.x; ++x) {
                l.block_index = uint3{x, y, z};
                ok = run_block(l);
            }
    std::free(l.shared);
    active = nullptr;
    last_error = l.error;
    return ok ? nullptr : last_error.c_str();
}

template <typename A>
constexpr std::size_t pointee_size() {
    if constexpr (std::is_pointer_v<A> && !std::is_void_v<std::remove_cv_t<std::remove_pointer_t<A>>>) {
        return sizeof(std::remove_pointer_t<A>);
    } else {
        return 0;
    }
}

// Call a kernel with its arguments as cuLaunchKernel takes them: args[i] points to argument i.
template <typename... Args, std::size_t... I>
void call_with(void (*kernel)(Args...), void* const* args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}
template <typename... Args>
void call(void (*kernel)(Args...), void* const* args) {
    call_with(kernel, args, std::index_sequence_for<Args...>{});
}

// For the Python side to check what it is handed: each parameter's size, whether it is a pointer, and the size of
// what it points to (0 for void). Called with null arrays, it only counts the parameters.
template <typename... Args>
int parameters(void (*)(Args...), std::size_t* sizes, int* pointers, std::size_t* pointees) {
    if (sizes != nullptr) {
        const std::size_t size[] = {sizeof(Args)..., 0};
        const int pointer[] = {std::is_pointer_v<Args>..., 0};
        const std::size_t pointee[] = {pointee_size<Args>()..., 0};
        for (std::size_t i = 0; i < sizeof...(Args); ++i)
            sizes[i] = size[i], pointers[i] = pointer[i], pointees[i] = pointee[i];
    }
    return static_cast<int>(sizeof...(Args));
}
}  // namespace course_emulator

// ---- the built-in variables and functions a kernel calls ----------------------------------------------------------
#define threadIdx (::course_emulator::active->current->index)
#define blockIdx (::course_emulator::active->block_index)
#define blockDim (::course_emulator::active->block)
#define gridDim (::course_emulator::active->grid)
constexpr int warpSize = course_emulator::WARP_SIZE;

inline void __syncthreads() {
    course_emulator::arrive(course_emulator::active->block_barrier, course_emulator::active->live, "__syncthreads");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    course_emulator::require_full_mask(mask, "__syncwarp");
    course_emulator::warp_exchange<int>("__syncwarp", 0);
}
[[noreturn]] inline void __trap() { course_emulator::fail("__trap()"); }

// Shuffles within segments of `width` lanes (a power of two up to 32), as the CUDA C++ Programming Guide defines
// them: a source outside the lane's segment (or, for xor, in a later segment) gives the lane its own value.
template <typename V>
V __shfl_sync(unsigned mask, V value, int source, int width = warpSize) {
    if (width < 1 || width > warpSize || (width & (width - 1)) != 0)
        course_emulator::fail("__shfl_sync: width must be a power of two up to 32");
    return course_emulator::shuffle_from(
        mask, value, [&](int lane) { return lane / width * width + (source & (width - 1)); }, "__shfl_sync");
}
template <typename V>
V __shfl_up_sync(unsigned mask, V value, unsigned delta, int width = warpSize) {
    const int d = static_cast<int>(delta);
    return course_emulator::shuffle_from(mask, value, [&](int lane) { return lane % width >= d ? lane - d : -1; },
                                         "__shfl_up_sync");
}
template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta, int width = warpSize) {
    const int d = static_cast<int>(delta);
    return course_emulator::shuffle_from(mask, value, [&](int lane) { return lane % width + d < width ? lane + d : -1; },
                                         "__shfl_down_sync");
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = warpSize) {
    return course_emulator::shuffle_from(
        mask, value, [&](int lane) { return (lane ^ lane_mask) / width > lane / width ? -1 : lane ^ lane_mask; },
        "__shfl_xor_sync");
}

// Votes: every lane's predicate, seen by every lane.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    course_emulator::require_full_mask(mask, "__ballot_sync");
    const auto all = course_emulator::warp_exchange<int>("__ballot_sync", predicate != 0);
    unsigned bits = 0;
    for (int lane = 0; lane < course_emulator::active->lanes_of(course_emulator::active->current->warp); ++lane)
        bits |= static_cast<unsigned>(all[lane]) << lane;
    return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// Loads through the read-only cache and memory fences: plain loads, and nothing to order, one fiber at a time.
template <typename V>
V __ldg(const V* p) {
    return *p;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// Atomics: a fiber is never interrupted between two waits, so a plain read-modify-write is already atomic.
template <typename V>
V atomicAdd(V* address, V value) {
    const V old = *address;
    *address = old + value;
    return old;
}
template <typename V>
V atomicMax(V* address, V value) {
    static_assert(std::is_integral_v<V>, "CUDA's atomicMax takes integers");
    const V old = *address;
    *address = old < value ? value : old;
    return old;
}

inline float __expf(float v) { return std::exp(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }

inline std::size_t __cvta_generic_to_shared(const void* p) { return course_emulator::shared_offset(p); }

// The PTX wrappers of tensor_core.cuh, by the names the kernels call.
using course_emulator::cp_async_16;
using course_emulator::cp_async_commit;
using course_emulator::cp_async_wait;
using course_emulator::ldmatrix_x4;
using course_emulator::ldmatrix_x4_trans;
using course_emulator::mma_m16n8k16;
