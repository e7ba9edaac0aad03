// The compiled hook: a hooked DeepEP call's whole capture work in C++, without Python bytecode.
//
// Why: a hook written in Python costs ~40-50 us per call on a 2-core CPU even when all it does is
// bind, key, stage and write a frame (bench/capture_hotpath.py); the budget is ~5 us. Here the
// Buffer method is a `Hook` object (a method descriptor with vectorcall): per call it reads the
// tensors' facts through libtorch (THPVariable_Unpack: no Python attribute calls), keys the call
// site by the arguments' types/dtypes/shapes/values, and when a *plan* for that key exists writes
// one FAST frame straight into the shared ring (shm_ring.py): fixed-layout fields, each array's
// dims and raw bytes. The writer process joins the frame with the plan (ring_frames.read_fast) and
// builds exactly the record the Python path would have built.
//
// Plans are learned, not written by hand: the first call of a new key goes through the Python
// hook (hooks.py, the reference path); after it wrote its CALL frame, fast_plan.py finds where
// every staged tensor came from (which argument slot or result element, by identity) and, when
// everything was found, hands the plan to `Session.learn`. On a GPU the call's CUDA arrays are
// gathered into the device ring by one launch, which also fingerprints the rows the level asks
// for (gather_kernel.py). A low-latency call with a recv hook writes its inputs at return
// (FAST_BEGIN) and its outputs from the hook's wrapper (RecvHook, FAST_END); its plan is learned
// in two steps, at return and when the hook ran. Anything a plan cannot express (payload steps,
// token tags not given as an int64 array, an error, outputs not shaped as learned) goes through
// the Python hook or a Python callback, so the records are the same either way
// (tests/test_capture_fast.py compares them).
//
// Everything here runs under the GIL, on the job's threads (hooks) and the watchdog's (hung()).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <optional>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <unordered_map>
#include <vector>

#include "_drain.h"
#include "_hosthash.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#ifndef EPREPLAY_TORCH_VERSION
#define EPREPLAY_TORCH_VERSION "unknown"
#endif

namespace {

// --- ring words (shm_ring.py) ----------------------------------------------------------------
constexpr int W_HEAD = 8, W_TAIL = 16, W_DROPPED = 32, W_DTAIL = 40;
constexpr uint16_t PAD_KIND = 0, FAST_KIND = 6;
constexpr uint64_t FAST_FIXED = 96;  // frame header 8 + plan 8 + call id 8 + 9 fields x 8
// A FAST frame's part (ring_frames.py): a whole call, or a recv hook's call's inputs / outputs
constexpr uint32_t PART_CALL = 0, PART_BEGIN = 1, PART_END = 2;
inline uint64_t align8(uint64_t n) { return (n + 7) & ~uint64_t(7); }

// Op codes (epreplay/format/records.py Op)
constexpr int OP_LAYOUT = 1, OP_DISPATCH = 2, OP_LL_DISPATCH = 5;
constexpr int64_t NONE = INT64_MIN;  // None in the shared int64 arrays
constexpr int64_t kTaggedKey = INT64_MIN + 7;  // in a call-site key: tags are pending at a dispatch hook

inline int64_t now_ns(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return int64_t(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// Built with -DHOOKX_PROFILE (EPREPLAY_HOOKX_CFLAGS, hookx_build.py): the hook's own time split
// by the segments PROF(i) ends, summed per thread, read by _hookx.profile() (bench/capture_hotpath
// prints them). Compiled out otherwise: not one instruction in the hook.
#ifdef HOOKX_PROFILE
constexpr int kProf = 10;
const char *const kProfNames[kProf] = {"enter+plan", "attribute+lineage", "(the call)", "arrays+hash jobs",
                                       "launch: stream handle", "launch: cuLaunchKernel", "gather: rest",
                                       "frame (write_fast)", "launch: ring+getStream", "launch: getDevice"};
thread_local int64_t t_prof[kProf + 1], t_prof_last;
#define PROF_START() (t_prof_last = now_ns(CLOCK_MONOTONIC), t_prof[kProf]++)
#define PROF(i) do { int64_t t_ = now_ns(CLOCK_MONOTONIC); t_prof[i] += t_ - t_prof_last; t_prof_last = t_; } while (0)
#define PROF_MARK() (t_prof_last = now_ns(CLOCK_MONOTONIC))  // a recv hook's END: its call's segments
#else
#define PROF_START() ((void)0)
#define PROF_MARK() ((void)0)
#define PROF(i) ((void)0)
#endif

// Where a value comes from: root 0 an argument slot (positional, then keywords in call order),
// root 1 an element of the result tuple; j >= 0: element j of that tuple; attr: that object's
// attribute (a DeepEP V2 EPHandle's field; an interned name, kept for the process).
struct Src {
  int root = -1, i = -1, j = -1;
  PyObject *attr = nullptr;
  bool set() const { return root >= 0; }
};

struct ArraySpec {
  Src src;
  c10::ScalarType dtype;
  int ndim;
  // 0: the tensor as it is; 1/2: the valid rows of a low-latency buffer [L, X, H] as [V, H],
  // rows [0, counts[e]) of each local expert e (extract._gather_valid): counts from a [L] tensor
  // (1: recv_count) or summed from a handle's layout_range [L, R] (2: the low 32 bits)
  int mode = 0;
  Src counts;
  // Fingerprinted rows (GPU, level fingerprints): the tensor at src (x, or an FP8 pair's x with
  // its scales at src2) is not staged but hashed by the gather launch into fp [L * X] int64 and
  // non-finite marks [L * X] int8, two arrays of the frame; mode 1/2: only the first counts[g]
  // rows of each group g (counts as above, read on the device)
  bool hash = false;
  Src src2;
};

struct Out {  // one staged array of a call: a tensor, the valid rows of one, or a hash output
  at::Tensor t;
  c10::SmallVector<int64_t, 64> rows;  // mode 1/2: valid rows per local expert (inline: no allocation per call)
  int64_t valid = 0;
  int hash_part = -1;  // 0: the fingerprints [n] int64, 1: the marks [n] int8 of hash job `job`
  int job = 0;
  int64_t n = 0;
  const void *host = nullptr;  // a host hash output's bytes (hashed by the hook: host_hash)
  uint64_t nbytes() const {
    if (hash_part >= 0) return uint64_t(n) * (hash_part ? 1 : 8);
    return rows.empty() ? t.nbytes() : uint64_t(valid) * row_bytes();
  }
  // a row: [H] of a [L, X, H] buffer, one element of an [L, X] one (src_info's valid entries)
  uint64_t row_bytes() const { return uint64_t(t.dim() == 3 ? t.size(-1) : 1) * t.element_size(); }
};

// The valid-row counts of `base` [L, X, H] or [L, X] from `c` (mode 1: [L]; mode 2: layout_range
// [L, R]).
bool valid_rows(int mode, const at::Tensor &base, const at::Tensor &c, Out &out) {
  if ((base.dim() != 3 && base.dim() != 2) || !c.defined() || !c.is_cpu() || !c.is_contiguous()) return false;
  int64_t L = base.size(0), X = base.size(1);
  if (c.size(0) != L) return false;
  // the counts' pointer once, not per expert: TensorBase::const_data_ptr<T> is an out-of-line
  // call into libtorch with its own checks (measured: ~1.3 us for L = 32 on a cold cache)
  const int32_t *c32 = nullptr;
  const int64_t *c64 = nullptr;
  int64_t R = 1;
  if (mode == 1 && c.dim() == 1 && c.scalar_type() == at::kInt) c32 = static_cast<const int32_t *>(c.const_data_ptr());
  else if (mode == 1 && c.dim() == 1 && c.scalar_type() == at::kLong) c64 = static_cast<const int64_t *>(c.const_data_ptr());
  else if (mode == 2 && c.dim() == 2 && c.scalar_type() == at::kLong) c64 = static_cast<const int64_t *>(c.const_data_ptr()), R = c.size(1);
  else return false;
  out.rows.resize(L);
  for (int64_t e = 0; e < L; e++) {
    int64_t n = 0;
    if (c32) n = c32[e];
    else if (mode == 1) n = c64[e];
    else for (int64_t k = 0; k < R; k++) n += c64[e * R + k] & 0xFFFFFFFF;
    if (n < 0 || n > X) return false;
    out.rows[e] = n;
    out.valid += n;
  }
  return true;
}

// An int list of the frame: a list at `src`, or (composite) one made each call of ints read from
// sources (kind 0 an int, 1 a truth value as 0/1) and constants (kind 2): extract_v2's "_v2".
struct IntElem {
  int kind = 2;
  Src src;
  int64_t c = 0;
};
struct ValueSpec {
  Src src;
  bool composite = false;
  std::vector<IntElem> ints;
};

struct Plan {
  uint32_t id = 0;
  int op = 0;
  bool parity = false;     // meta ll_parity per call (the Buffer's low-latency call count % 2)
  Src lookup, remember;    // dispatch_seq from this handle's first tensor / remember this one
  Src tokens_src;          // the call's tokens: this tensor's rows (else the constant)
  int64_t tokens = 0;
  int arg_dims = 0;        // dims of the argument tensors (the frame carries them: descriptions)
  bool device = false;     // CUDA arrays: one gather launch into the device ring (device_stage.py)
  Src after;               // async_finish: the EventOverlap the outputs are ready after (a GPU plan)
  std::vector<ArraySpec> arrays;
  std::vector<ValueSpec> values;  // int lists
  int total_dims = 0;
  // A low-latency call whose outputs come with its recv hook (result element hook_at): the plan
  // above is its inputs' part (a FAST_BEGIN frame at return) and `end` its outputs' part (a
  // FAST_END frame written by the hook's wrapper, RecvHook; every source in the result)
  int hook_at = -1;
  Plan *end = nullptr;
  Plan() = default;
  Plan(const Plan &) = delete;
  Plan &operator=(const Plan &) = delete;
  ~Plan() { delete end; }
};

struct Key {
  std::vector<int64_t> v;
  bool operator==(const Key &o) const { return v == o.v; }
};
struct KeyHash {
  size_t operator()(const Key &k) const {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t x : k.v) h = (h ^ uint64_t(x)) * 1099511628211ULL;
    return size_t(h);
  }
};

struct BufInfo {
  PyObject *state;  // the BufferState (strong): its address stays unique while cached
  int64_t *cnt;     // [seq, ll_calls], shared with BufferState.seq / ll_calls
  int64_t id;
  Py_buffer view;
};

struct Hook;
struct InFlight {  // a fast call between entry and its frame, for the watchdog
  InFlight *next, *prev;
  Hook *hook;
  uint64_t call_id;
  int op;
  int64_t buffer, seq, step, layer, start_ns, mono_ns;
  PyObject *const *args;
  size_t nargs;
  PyObject *kwnames;
  PyObject *tags;  // the token tags this dispatch took (capture.tag_tokens), [T] int64; or nullptr
  int64_t parity;  // its ll_parity (the Buffer's low-latency call count % 2, counted), or -1
  bool reported;
};

class LineageTable;  // handles' dispatch seq (below)

struct Session {
  PyObject_HEAD
  PyObject *rec;         // callbacks: _fast_raised, _fast_mismatch (recorder.py)
  PyObject *marks_local; // epreplay.marks._local
  PyObject *views;       // the arrays whose buffers we hold (kept alive)
  Py_buffer state_v, attr_v, stats_v;
  uint64_t *state;       // ring producer state [head, tail seen, deferred, busy]
  volatile uint64_t *words;
  char *base;
  uint64_t cap;
  int64_t *attr;         // [marked step, auto step, auto layer, layer opened by]
  int64_t *stats;        // [hot ns, calls, dropped, frames]
  int64_t layers_per_step;
  bool enabled;
  uint64_t next_id;
  std::unordered_map<Key, Plan *, KeyHash> *plans;
  std::unordered_map<PyObject *, BufInfo> *bufs;
  LineageTable *lineage;
  InFlight inflight;     // list head
  // GPU sessions (set_device): the device ring D, its host state [head, writer's release as
  // last read] shared with device_stage.DeviceStage, graph_ring's capture count, and the streams
  // gathered on since the drain last looked
  at::Tensor *D;
  Py_buffer dstate_v, capt_v;
  int64_t *dstate, *capturing;
  std::vector<c10::Stream> *streams;
  // the native drain (_drainc.Drainer, held) and its streams table: a call notes its stream and
  // advances D's head there (_drain.h) instead of in `streams` and dstate[0]
  PyObject *drainer;
  epr_streams *tbl;
  // D's CUcontext and the driver's cuCtxGetCurrent (0: compare devices through c10 instead): is
  // the calling thread in D's context, where the gather kernel lives? A driver TLS read, where
  // c10's getDevice() (cudaGetDevice) costs 0.6-1.1 us a call on an H100 host
  void *dctx, *ctx_get;
  // async_finish outputs (a plan with `after`): gathered on device_stage's side stream once it
  // waited for the job's stream (an event of our own) and for DeepEP's event, as the Python
  // hook's gather does; the side stream as c10 and raw handle, and the driver's cuEventRecord
  // and cuStreamWaitEvent
  c10::Stream *side;
  void *side_h, *after_ev, *ev_record, *wait_event;
  bool state5;  // the state buffer has its 5th word (frames written, for the native drain)
  // The raw gather launch (gather_kernel.py; set_gather): the kernel's CUfunction, the driver's
  // cuLaunchKernel, a Python callable giving the current cudaStream_t, that answer cached per
  // stream id
  void *gfunc, *glaunch, *gfunc_hash;  // gfunc_hash: the gather with fingerprinted rows
  bool gshared;  // EPREPLAY_CAPTURE_GATHER_PER_SEG=0: every copy block strides over every segment (the bench's reference)
  PyObject *stream_of;
  std::vector<std::pair<int64_t, void *>> *shandles;
  int64_t glaunches[3];  // [raw launches, at::cat_out launches, ns spent launching]
  // plans a learn replaced: a recv hook's wrapper may still hold one (freed with the session)
  std::vector<Plan *> *retired;
};

constexpr int kKeyCached = 40;  // int64 words of a key a Hook remembers (DeepEP's sites: ~25)

struct Hook {
  PyObject_HEAD
  PyObject *orig, *slow, *dict;
  int op;  // the method's op (DISPATCH becomes CACHED_DISPATCH with a handle: keyed)
  vectorcallfunc vectorcall;
  // The plan of the last key this hook looked up, valid while g_plans_changed is what it was: a
  // call site calls the same way every time, and the session's map (its buckets, node and key,
  // cold after a DeepEP call: ~0.3 us) is then not read at all.
  uint64_t seen_gen;
  const Plan *seen_plan;
  int seen_len;
  int64_t seen_key[kKeyCached];
  // The Buffer it was last called on (a weak reference: the same object while it answers) and
  // that Buffer's BufInfo, valid while g_plans_changed is seen_bgen: no attribute lookup and map
  // find per call (~0.3 us cold)
  uint64_t seen_bgen;
  PyObject *seen_buf, *seen_wr;
  BufInfo *seen_bi;
};

// Moves whenever a plan may have gone or a session changed (learn, clear, activate, fork): the
// Hooks' remembered plans are then looked up again.
uint64_t g_plans_changed = 1;

Session *g_sess = nullptr;  // the active session of this process (strong ref), or null
thread_local int t_depth = 0;  // > 0 inside a hooked call: nested hooked calls pass through

// What the Python path needs to learn a plan for the call it is handling (this thread).
struct Pending {
  bool active = false;
  Key key;
  Hook *hook = nullptr;
  Py_ssize_t nargs = 0;
  PyObject *kwnames = nullptr;
};
thread_local Pending t_pending;
thread_local Key t_key;  // the key of the call this thread's hook is looking up

PyObject *s_dict, *s_state, *s_step, *s_layer, *s_pending_tags, *s_epreplay_capture, *s_owner, *s_cnt, *s_id,
    *s_fast_raised, *s_fast_mismatch, *s_current_stream_wait;

// A tensor, by type alone: THPVariable_Check's fallback for anything but an exact Tensor is
// PyObject_IsInstance (a metaclass __instancecheck__ call, ~0.1 us), paid by every None, int and
// handle tuple key_of and put_dims look at; a subtype test needs no call.
inline bool is_tensor(PyObject *v) {
  return THPVariable_CheckExact(v) || (THPVariableClass && PyObject_TypeCheck(v, reinterpret_cast<PyTypeObject *>(THPVariableClass)));
}

// --- keys ------------------------------------------------------------------------------------
// One argument's part of the call-site key (ring_path._key's rules, but a tensor's leading dims
// are not part of it: rows received change every call, and the frame carries every argument's
// dims): scalars by value, tensors by dtype/device/rank/last dim of 2+-D, tuples element-wise, lists by
// length, a Config by identity, else by type.
bool key_of(PyObject *v, std::vector<int64_t> &k, int depth = 0) {
  if (v == Py_None) { k.push_back(1); return true; }
  if (PyBool_Check(v)) { k.push_back(2); k.push_back(v == Py_True); return true; }
  if (PyLong_CheckExact(v)) {
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) { k.push_back(9); k.push_back(PyObject_Hash(v)); return true; }
    k.push_back(3); k.push_back(x);
    return true;
  }
  if (PyFloat_CheckExact(v)) {
    double d = PyFloat_AS_DOUBLE(v);
    int64_t bits;
    memcpy(&bits, &d, 8);
    k.push_back(4); k.push_back(bits);
    return true;
  }
  if (PyUnicode_CheckExact(v)) { k.push_back(5); k.push_back(PyObject_Hash(v)); return true; }
  if (is_tensor(v)) {
    const at::Tensor &t = THPVariable_Unpack(v);
    if (!t.defined()) { k.push_back(10); return true; }
    k.push_back(6);
    k.push_back(int64_t(t.scalar_type()));
    k.push_back(int64_t(t.device().type()) * 1024 + t.device().index());
    k.push_back(t.dim());
    k.push_back(t.dim() >= 2 ? t.size(-1) : -1);  // hidden, top-k, ranks; not a 1-D tensor's rows
    return true;
  }
  if (PyTuple_CheckExact(v) && depth < 2) {
    Py_ssize_t n = PyTuple_GET_SIZE(v);
    k.push_back(7); k.push_back(n);
    for (Py_ssize_t i = 0; i < n; i++)
      if (!key_of(PyTuple_GET_ITEM(v, i), k, depth + 1)) return false;
    return true;
  }
  if (PyList_CheckExact(v)) { k.push_back(8); k.push_back(PyList_GET_SIZE(v)); return true; }
  PyTypeObject *tp = Py_TYPE(v);
  k.push_back(11);
  k.push_back(int64_t(intptr_t(tp)));
  const char *name = strrchr(tp->tp_name, '.');
  name = name ? name + 1 : tp->tp_name;
  if (strcmp(name, "Config") == 0) k.push_back(int64_t(intptr_t(v)));
  return true;
}

// The dims of every argument tensor, in key_of's order (the writer renders descriptions from them).
int64_t *put_dims(PyObject *v, int64_t *w, int depth = 0) {
  if (is_tensor(v)) {
    const at::Tensor &t = THPVariable_Unpack(v);
    if (t.defined())
      for (int64_t d : t.sizes()) *w++ = d;
  } else if (PyTuple_CheckExact(v) && depth < 2) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(v); i++) w = put_dims(PyTuple_GET_ITEM(v, i), w, depth + 1);
  }
  return w;
}

// --- sources -----------------------------------------------------------------------------------
inline PyObject *slot(PyObject *const *args, Py_ssize_t nslots, int i) {
  return (i >= 0 && i < nslots) ? args[i] : nullptr;
}

// The token tags the running dispatch took (root 2 of a Src; take_tags), borrowed from hook_call.
thread_local PyObject *t_tags = nullptr;

// Objects an attribute Src read (new references): released when the Held that was innermost
// when they were read goes (stage_write, the lineage lookup), so resolve() stays borrowed-style.
thread_local std::vector<PyObject *> t_held;
struct Held {
  size_t mark = t_held.size();
  ~Held() {
    while (t_held.size() > mark) {
      PyObject *o = t_held.back();
      t_held.pop_back();
      Py_DECREF(o);
    }
  }
};

PyObject *resolve(const Src &s, PyObject *const *slots, Py_ssize_t nslots, PyObject *result) {
  PyObject *v = nullptr;
  if (s.root == 0) {
    v = slot(slots, nslots, s.i);
  } else if (s.root == 1) {
    if (!result || !PyTuple_Check(result) || s.i >= PyTuple_GET_SIZE(result)) return nullptr;
    v = PyTuple_GET_ITEM(result, s.i);
  } else if (s.root == 2) {
    v = t_tags;
  }
  if (v && s.j >= 0) v = PyTuple_Check(v) && s.j < PyTuple_GET_SIZE(v) ? PyTuple_GET_ITEM(v, s.j) : nullptr;
  if (!v || !s.attr) return v;
  PyObject *a = PyObject_GetAttr(v, s.attr);
  if (!a) return PyErr_Clear(), nullptr;
  t_held.push_back(a);
  return a;
}

// --- lineage: which dispatch made a handle (combine's meta dispatch_seq) ---------------------
// An open-addressed table (linear probing, no deletions: it is rebuilt with the live entries when
// half full), so that remembering a dispatch's handle allocates nothing: a std::unordered_map
// node per dispatch cost ~1 us of a low-latency dispatch's hook time. Each entry holds a weak
// reference: it keeps the TensorImpl's memory, so a live entry's address is that tensor's.
class LineageTable {
 public:
  void put(const at::Tensor &t, int64_t seq) {
    c10::TensorImpl *impl = t.unsafeGetTensorImpl();
    if (slots_.empty() || 2 * (used_ + 1) > slots_.size()) rebuild();
    Slot &e = find(impl);
    if (!e.key) {
      e.key = impl;
      e.weak.emplace(t.getIntrusivePtr());
      used_++;
    }
    e.seq = seq;
  }
  int64_t get(const at::Tensor &t) {
    if (slots_.empty()) return -1;
    const Slot &e = find(t.unsafeGetTensorImpl());
    return e.key && !e.weak->expired() ? e.seq : -1;
  }
  void clear() {
    slots_.clear();
    used_ = 0;
  }

 private:
  struct Slot {
    c10::TensorImpl *key = nullptr;
    int64_t seq = 0;
    // the tensor's own NullType: a weak_intrusive_ptr<TensorImpl> (the default one) would be
    // made through a temporary strong pointer, whose refcount 1 -> 2 -> 1 trips intrusive_ptr's
    // PyObject preservation (an incref and a decref of the tensor's PyObject, two virtual calls)
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> weak;
  };
  std::vector<Slot> slots_;  // a power of 2 long
  size_t used_ = 0;

  Slot &find(c10::TensorImpl *impl) {  // its entry, or the empty slot where it would go
    size_t mask = slots_.size() - 1, i = size_t((uintptr_t(impl) >> 4) * 0x9E3779B97F4A7C15ULL >> 20) & mask;
    while (slots_[i].key && slots_[i].key != impl) i = (i + 1) & mask;
    return slots_[i];
  }
  void rebuild() {  // drop the entries of handles that are gone; room for twice the live ones
    std::vector<Slot> old;
    old.swap(slots_);
    size_t live = 0;
    for (const Slot &e : old) live += e.key && !e.weak->expired();
    size_t n = 1024;
    while (n < 4 * (live + 1)) n *= 2;
    slots_.resize(n);
    used_ = 0;
    for (Slot &e : old) {
      if (!e.key || e.weak->expired()) continue;
      Slot &d = find(e.key);
      d = std::move(e);
      used_++;
    }
  }
};

void lineage_put(Session *s, const at::Tensor &t, int64_t seq) { s->lineage->put(t, seq); }

int64_t lineage_get(Session *s, const at::Tensor &t) { return s->lineage->get(t); }

// --- the ring ------------------------------------------------------------------------------------
bool reserve(Session *s, uint64_t n, uint64_t *out_off) {
  uint64_t *state = s->state;
  uint64_t head = state[0], cap = s->cap;
  uint64_t off = head % cap;
  uint64_t pad = (off + n > cap) ? cap - off : 0;
  if (n > cap) return false;
  if (head + pad + n - state[1] > cap) {
    state[1] = s->words[W_TAIL];
    if (head + pad + n - state[1] > cap) return false;
  }
  if (pad) {
    uint32_t len = uint32_t(pad);
    uint16_t kind = PAD_KIND, spare = 0;
    memcpy(s->base + off, &len, 4);
    memcpy(s->base + off + 4, &kind, 2);
    memcpy(s->base + off + 6, &spare, 2);
    off = 0;
  }
  state[0] = head + pad + n;
  *out_off = off;
  return true;
}

// --- marks and step/layer attribution (recorder._attribute, same rules) -------------------------
// This thread's attribute dict of epreplay.marks._local (a threading.local), looked up once per
// thread: getattr(_local, "state") on a thread that never marked anything raises and clears an
// AttributeError, ~2.5 us of the hook's ~5 us budget per call. A threading.local keeps one dict
// per thread for the thread's life; the strong references (the local too, so its address cannot
// be reused) are a few hundred bytes per thread that ever made a hooked call.
thread_local PyObject *t_marks_local = nullptr, *t_marks_dict = nullptr;

PyObject *marks_dict(Session *s) {
  if (t_marks_local != s->marks_local || !t_marks_dict) {
    PyObject *d = PyObject_GetAttr(s->marks_local, s_dict);
    if (!d || !PyDict_Check(d)) {
      Py_XDECREF(d);
      return nullptr;
    }
    Py_INCREF(s->marks_local);
    Py_XSETREF(t_marks_local, s->marks_local);
    Py_XSETREF(t_marks_dict, d);
  }
  return t_marks_dict;
}

bool read_state_attrs(PyObject *st, int64_t *m_step, int64_t *m_layer, bool *tags) {
  Py_INCREF(st);
  PyObject *v;
  if ((v = PyObject_GetAttr(st, s_step))) {
    if (v != Py_None) *m_step = PyLong_AsLongLong(v);
    Py_DECREF(v);
  }
  if ((v = PyObject_GetAttr(st, s_layer))) {
    if (v != Py_None) *m_layer = PyLong_AsLongLong(v);
    Py_DECREF(v);
  }
  if ((v = PyObject_GetAttr(st, s_pending_tags))) {
    *tags = v != Py_None;
    Py_DECREF(v);
  }
  Py_DECREF(st);
  return !PyErr_Occurred();
}

// read_marks' last answer on this thread, good while neither dict it came from changed: PEP 509's
// version tag moves on every change of a dict and is never reused, so two header reads stand in
// for the lookups (~8 dependent cache lines, all cold after a DeepEP call: ~0.4 us a call).
// Python 3.14 no longer moves it; there read_marks looks every time.
#if PY_VERSION_HEX < 0x030E0000
#define MARKS_SEEN 1
struct MarksSeen {
  PyObject *d = nullptr, *sd = nullptr;  // the thread's marks dict; its state's dict (strong)
  uint64_t d_ver = 0, sd_ver = 0;
  int64_t step = 0, layer = 0;
  bool tags = false;
};
thread_local MarksSeen t_marks_seen;
inline uint64_t dict_version(PyObject *d) { return reinterpret_cast<PyDictObject *>(d)->ma_version_tag; }
#endif

// Reads epreplay.marks' thread-local state: (step, layer) or NONE, and whether tags are pending.
bool read_marks(Session *s, int64_t *m_step, int64_t *m_layer, bool *tags) {
  *m_step = *m_layer = NONE;
  *tags = false;
  PyObject *d = marks_dict(s);
  if (!d) return false;
#ifdef MARKS_SEEN
  MarksSeen &seen = t_marks_seen;
  if (seen.sd && seen.d == d && dict_version(d) == seen.d_ver && dict_version(seen.sd) == seen.sd_ver) {
    *m_step = seen.step, *m_layer = seen.layer, *tags = seen.tags;
    return true;
  }
#endif
  PyObject *st = PyDict_GetItemWithError(d, s_state);  // borrowed
  if (!st) return !PyErr_Occurred();
  // marks' _State is a plain object: its instance dict answers without the type's attribute
  // lookup (~3 cold cache lines less per field); anything else goes through getattr
  PyObject *sd = PyObject_GenericGetDict(st, nullptr);
  if (!sd || !PyDict_Check(sd)) {
    Py_XDECREF(sd);
    PyErr_Clear();
    return read_state_attrs(st, m_step, m_layer, tags);
  }
  PyObject *step = PyDict_GetItemWithError(sd, s_step), *layer = step ? PyDict_GetItemWithError(sd, s_layer) : nullptr,
           *pend = layer ? PyDict_GetItemWithError(sd, s_pending_tags) : nullptr;
  if (pend) {
    if (step != Py_None) *m_step = PyLong_AsLongLong(step);
    if (layer != Py_None) *m_layer = PyLong_AsLongLong(layer);
    *tags = pend != Py_None;
#ifdef MARKS_SEEN
    if (!PyErr_Occurred()) {  // d holds st, st holds sd: while both are unchanged, so is the answer
      Py_INCREF(sd);
      Py_XSETREF(seen.sd, sd);
      seen.d = d, seen.d_ver = dict_version(d), seen.sd_ver = dict_version(sd);
      seen.step = *m_step, seen.layer = *m_layer, seen.tags = *tags;
    }
#endif
  }
  Py_DECREF(sd);
  if (!pend) return !PyErr_Occurred() && read_state_attrs(st, m_step, m_layer, tags);
  return !PyErr_Occurred();
}

// The pending token tags (epreplay.marks.tag_tokens) as a [T] int64 host tensor, taken (they
// apply to one dispatch only: marks.take_tags' rule): a 1-D int64/int32/int16 tensor, a list of
// ints, a 1-D int64/int32/uint32 buffer (numpy), widened to int64 as torch.as_tensor(tags,
// dtype=int64) does. A new reference; nullptr (nothing taken, no error set) for other forms: the
// Python hook then takes them, converting what torch.as_tensor converts.
PyObject *take_tags(Session *s) {
  PyObject *d = marks_dict(s);
  PyObject *st = d ? PyDict_GetItemWithError(d, s_state) : nullptr;  // borrowed
  PyObject *pend = st ? PyObject_GetAttr(st, s_pending_tags) : nullptr;
  if (!pend) return PyErr_Clear(), nullptr;
  PyObject *t = nullptr;
  try {
    if (THPVariable_Check(pend)) {
      const at::Tensor &x = THPVariable_Unpack(pend);
      if (x.defined() && x.is_cpu() && x.dim() == 1 && x.scalar_type() == at::kLong && x.is_contiguous())
        t = (Py_INCREF(pend), pend);  // the Python hook snapshots it: the frame copies it below
      else if (x.defined() && x.is_cpu() && x.dim() == 1 && (x.scalar_type() == at::kInt || x.scalar_type() == at::kShort))
        t = THPVariable_Wrap(x.to(at::kLong));  // widened, as torch.as_tensor(tags, dtype=int64)
    } else if (PyList_CheckExact(pend)) {  // a list of ints
      Py_ssize_t n = PyList_GET_SIZE(pend);
      at::Tensor x = at::empty({int64_t(n)}, at::kLong);
      int64_t *w = static_cast<int64_t *>(x.data_ptr());
      bool ok = true;
      for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *v = PyList_GET_ITEM(pend, i);
        ok = PyLong_CheckExact(v);
        if (ok) w[i] = PyLong_AsLongLong(v);
        ok = ok && !(w[i] == -1 && PyErr_Occurred());  // (an int past int64: Python's to say)
      }
      if (ok) t = THPVariable_Wrap(std::move(x));
    } else if (pend != Py_None && PyObject_CheckBuffer(pend)) {
      Py_buffer b;
      if (PyObject_GetBuffer(pend, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        const char *fmt = b.format ? b.format : "B";
        if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
        // 1-D int64 copied; int32 / uint32 (numpy's "i" / "I", "l" / "L" where long is 4 bytes) widened
        bool i64 = b.itemsize == 8 && (!strcmp(fmt, "l") || !strcmp(fmt, "q"));
        bool i32 = b.itemsize == 4 && (!strcmp(fmt, "i") || !strcmp(fmt, "l"));
        bool u32 = b.itemsize == 4 && (!strcmp(fmt, "I") || !strcmp(fmt, "L"));
        if (b.ndim == 1 && (i64 || i32 || u32)) {
          Py_ssize_t n = b.len / b.itemsize;
          at::Tensor x = at::empty({int64_t(n)}, at::kLong);
          int64_t *w = static_cast<int64_t *>(x.data_ptr());
          if (i64) memcpy(w, b.buf, size_t(b.len));
          else if (i32) for (Py_ssize_t i = 0; i < n; i++) w[i] = static_cast<const int32_t *>(b.buf)[i];
          else for (Py_ssize_t i = 0; i < n; i++) w[i] = static_cast<const uint32_t *>(b.buf)[i];
          t = THPVariable_Wrap(std::move(x));
        }
        PyBuffer_Release(&b);
      }
    }
  } catch (const std::exception &) {
    Py_CLEAR(t);
  }
  PyErr_Clear();
  if (t && PyObject_SetAttr(st, s_pending_tags, Py_None) < 0) {
    PyErr_Clear();
    Py_CLEAR(t);
  }
  Py_DECREF(pend);
  return t;
}

// While a dispatch's hook holds the tags it took: resolve() finds them (root 2), and they go
// (with the previous call's, for a call nested in this one's tail) when the hook returns.
struct TagsHold {
  PyObject *own, *prev;
  explicit TagsHold(PyObject *t) : own(t), prev(t_tags) { t_tags = t; }
  ~TagsHold() {
    t_tags = prev;
    Py_XDECREF(own);
  }
};

void attribute(Session *s, int op, int64_t m_step, int64_t m_layer, int64_t *step, int64_t *layer) {
  int64_t *a = s->attr;  // [marked, auto step, auto layer, opened by]
  if (m_step != NONE && m_step != a[0]) {
    a[0] = m_step;
    a[2] = -1;
    a[3] = -1;
  }
  if (op == OP_LAYOUT || op == OP_DISPATCH || op == OP_LL_DISPATCH) {
    if (!(op != OP_LAYOUT && a[3] == OP_LAYOUT)) {
      a[2] += 1;
      if (s->layers_per_step && a[2] >= s->layers_per_step) {
        a[1] += 1;
        a[2] = 0;
      }
    }
    a[3] = op;
  }
  *step = m_step != NONE ? m_step : a[1];
  *layer = m_layer != NONE ? m_layer : (a[2] > 0 ? a[2] : 0);
}

// --- the hook ----------------------------------------------------------------------------------
PyObject *call_through(PyObject *fn, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
  t_depth++;
  PyObject *r = PyObject_Vectorcall(fn, args, nargsf, kwnames);
  t_depth--;
  return r;
}

// The Python hook handles this call; with a key, it may learn a plan for it (fast_plan.py).
PyObject *slow_path(Hook *h, PyObject *const *args, size_t nargsf, PyObject *kwnames, Key *key) {
  Pending saved = std::move(t_pending);
  t_pending = Pending();
  if (key) {
    t_pending.active = true;
    t_pending.key = *key;  // a copy: *key is the thread's reused buffer
    t_pending.hook = h;
    t_pending.nargs = PyVectorcall_NARGS(nargsf) - 1;
    t_pending.kwnames = kwnames;
  }
  PyObject *r = PyObject_Vectorcall(h->slow, args, nargsf, kwnames);
  t_pending = std::move(saved);
  return r;
}

BufInfo *buffer_info(Session *s, PyObject *buf) {
  PyObject *bs = PyObject_GetAttr(buf, s_epreplay_capture);
  if (!bs) {
    PyErr_Clear();
    return nullptr;
  }
  auto it = s->bufs->find(bs);
  if (it != s->bufs->end()) {
    Py_DECREF(bs);
    return &it->second;
  }
  // First fast call of this Buffer in this session: its BufferState must be this recorder's.
  PyObject *owner = PyObject_GetAttr(bs, s_owner);
  PyObject *cnt = owner == s->rec ? PyObject_GetAttr(bs, s_cnt) : nullptr;
  PyObject *id = cnt ? PyObject_GetAttr(bs, s_id) : nullptr;
  Py_XDECREF(owner);
  BufInfo info{};
  if (!cnt || !id || PyObject_GetBuffer(cnt, &info.view, PyBUF_WRITABLE) < 0 || info.view.len < 16) {
    PyErr_Clear();
    Py_XDECREF(cnt);
    Py_XDECREF(id);
    Py_DECREF(bs);
    return nullptr;
  }
  info.state = bs;  // the reference we got
  info.cnt = static_cast<int64_t *>(info.view.buf);
  info.id = PyLong_AsLongLong(id);
  Py_DECREF(cnt);
  Py_DECREF(id);
  BufInfo &kept = (*s->bufs)[bs];  // node-based map: the reference survives rehashing
  kept = info;
  return &kept;
}

PyObject *args_tuple(PyObject *const *slots, Py_ssize_t nargs) {
  PyObject *t = PyTuple_New(nargs);
  for (Py_ssize_t i = 0; t && i < nargs; i++) {
    Py_INCREF(slots[i]);
    PyTuple_SET_ITEM(t, i, slots[i]);
  }
  return t;
}

PyObject *kwargs_dict(PyObject *const *slots, Py_ssize_t nargs, PyObject *kwnames) {
  PyObject *d = PyDict_New();
  Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; d && k < nk; k++)
    if (PyDict_SetItem(d, PyTuple_GET_ITEM(kwnames, k), slots[nargs + k]) < 0) Py_CLEAR(d);
  return d;
}

// The fast call's identity, for the Python callbacks (recorder._fast_raised / _fast_mismatch).
// (call id, op, BufferState, seq, step, layer, start_ns, duration_ns, hook, the tags it took or None,
// its ll_parity or -1: the Python path must not count the Buffer's low-latency calls again)
PyObject *identity(const InFlight &f, PyObject *bs, int64_t duration) {
  return Py_BuildValue("(KiOLLLLLOOL)", (unsigned long long)f.call_id, f.op, bs, (long long)f.seq,
                       (long long)f.step, (long long)f.layer, (long long)f.start_ns, (long long)duration,
                       reinterpret_cast<PyObject *>(f.hook), f.tags ? f.tags : Py_None, (long long)f.parity);
}

// Hands a fast call back to the recorder: rec.<method>(identity, args, kwargs, last), where last
// is the exception it raised or its result; what it returned (a new reference) or nullptr.
// Whatever that raises is dropped: the job goes on.
PyObject *hand_back(Session *s, PyObject *method, const InFlight &f, PyObject *bs, int64_t duration,
                    PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject *last) {
  PyObject *ident = identity(f, bs, duration);
  PyObject *a = args_tuple(args, nargs), *kw = kwargs_dict(args + 1, nargs - 1, kwnames);
  PyObject *r = (ident && a && kw) ? PyObject_CallMethodObjArgs(s->rec, method, ident, a, kw, last, nullptr) : nullptr;
  if (!r) PyErr_Clear();
  Py_XDECREF(ident);
  Py_XDECREF(a);
  Py_XDECREF(kw);
  return r;
}

// Copies n bytes into the ring. Large copies use non-temporal stores (x86-64): the frame's bytes
// are for the writer process, not for this core, so they neither read the ring's lines first
// (no read-for-ownership) nor evict the job's own working set from the cache; the caller orders
// them before the publishing store with an sfence (ring_fence). Small ones stay plain memcpy.
constexpr size_t NT_MIN = 4096;
#if defined(__x86_64__) || defined(_M_X64)
// 64-byte streaming stores where the CPU has AVX-512: each store is a whole cache line, so a
// write-combining buffer leaves complete at once instead of after four 16-byte stores (measured
// in the hook, a decode dispatch's 256 KiB at fingerprints: 22 -> 17 us).
__attribute__((target("avx512f"))) void nt_copy64(char *dst, const char *src, size_t n) {
  size_t head = (64 - (uintptr_t(dst) & 63)) & 63;
  memcpy(dst, src, head);
  dst += head, src += head, n -= head;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    _mm_prefetch(src + i + 2048, _MM_HINT_T0);  // cold after the call (as in _hosthash.h):
    _mm_prefetch(src + i + 2048 + 64, _MM_HINT_T0);  // prefill routing 25.5-25.9 -> 23.9-24.5 us
    __m512i a = _mm512_loadu_si512(src + i), b = _mm512_loadu_si512(src + i + 64);
    _mm512_stream_si512(reinterpret_cast<__m512i *>(dst + i), a);
    _mm512_stream_si512(reinterpret_cast<__m512i *>(dst + i + 64), b);
  }
  memcpy(dst + i, src + i, n - i);
}
const bool g_avx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
#endif
void ring_copy(char *dst, const char *src, size_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  if (n >= NT_MIN && g_avx512) return nt_copy64(dst, src, n);
  if (n >= NT_MIN) {
    size_t head = (16 - (uintptr_t(dst) & 15)) & 15;
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
      __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i));
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i + 16));
      __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i + 32));
      __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  memcpy(dst, src, n);
}

// Non-temporal stores are weakly ordered: fence them before the store that publishes the frame.
inline void ring_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// Writes the FAST frame of a call that returned; false when it is dropped (counted).
bool write_fast(Session *s, const Plan &p, const InFlight &f, int64_t tokens, int64_t duration,
                int64_t parity, int64_t dseq, const std::vector<Out> &ts,
                const std::vector<PyObject *> &vals, PyObject *const *slots, Py_ssize_t nslots,
                int64_t dev_start, uint32_t part) {
  uint64_t head = FAST_FIXED + 8 * uint64_t(p.arg_dims + p.total_dims), data = 0;
  for (PyObject *v : vals) head += 8 + 8 * uint64_t(PyList_GET_SIZE(v));
  if (dev_start < 0)  // else the bytes are in the device ring, gathered already
    for (const auto &o : ts) data += align8(o.nbytes());
  uint64_t size = head + data, off;
  if (!reserve(s, size, &off)) {
    s->words[W_DROPPED] += 1;
    s->stats[2] += 1;
    return false;
  }
  char *at = s->base + off;
  uint32_t len32 = uint32_t(size), pid = p.id;
  uint16_t kind = FAST_KIND, zero16 = 0;
  memcpy(at, &len32, 4);
  memcpy(at + 4, &kind, 2);
  memcpy(at + 6, &zero16, 2);
  memcpy(at + 8, &pid, 4);
  memcpy(at + 12, &part, 4);
  memcpy(at + 16, &f.call_id, 8);
  int64_t fields[9] = {f.seq, f.step, f.layer, f.start_ns, tokens, duration, parity, dseq, dev_start};
  memcpy(at + 24, fields, sizeof fields);
  int64_t *w = reinterpret_cast<int64_t *>(at + FAST_FIXED);
  for (Py_ssize_t i = 0; i < nslots; i++) w = put_dims(slots[i], w);
  for (const auto &o : ts) {
    if (o.hash_part >= 0) {
      *w++ = o.n;
    } else if (o.rows.empty()) {
      for (int64_t d : o.t.sizes()) *w++ = d;
    } else {  // the valid rows: [V, H], or [V] of an [L, X] buffer
      *w++ = o.valid;
      if (o.t.dim() == 3) *w++ = o.t.size(-1);
    }
  }
  for (PyObject *v : vals) {
    Py_ssize_t n = PyList_GET_SIZE(v);
    *w++ = n;
    for (Py_ssize_t i = 0; i < n; i++) *w++ = PyLong_AsLongLong(PyList_GET_ITEM(v, i));
  }
  char *dst = at + head;
  for (size_t k = 0; dev_start < 0 && k < ts.size(); k++) {
    const Out &o = ts[k];
    size_t nb = o.nbytes();
    if (o.hash_part >= 0) {
      if (nb) memcpy(dst, o.host, nb);
    } else if (o.rows.empty()) {
      if (nb) ring_copy(dst, static_cast<const char *>(o.t.data_ptr()), nb);
    } else {  // expert-major: rows [0, rows[e]) of each local expert
      const char *src = static_cast<const char *>(o.t.data_ptr());
      uint64_t rb = o.row_bytes(), per_expert = rb * uint64_t(o.t.size(1));
      char *d = dst;
      for (size_t e = 0; e < o.rows.size(); e++) {
        ring_copy(d, src + e * per_expert, rb * uint64_t(o.rows[e]));
        d += rb * uint64_t(o.rows[e]);
      }
    }
    dst += align8(nb);
  }
  ring_fence();
  if (!s->state[2]) s->words[W_HEAD] = s->state[0];  // publish: one 8-byte store after the bytes
  else if (s->state5) __atomic_store_n(&s->state[4], s->state[0], __ATOMIC_RELEASE);  // written
  s->stats[3] += 1;
  return true;
}

// The raw gather launch's parameter blocks: gather_kernel.py's `EpGather`, `EpHash` and
// `EpGatherHash`, field for field (the static_asserts hold them to the kernel's sizes).
constexpr size_t kMaxSegs = 24, kMaxHash = 4, kCopyBlocks = 1024;
struct GatherArgs {
  uint64_t dst;
  uint64_t src[kMaxSegs];      // 0: a hash output's place (the copy skips it)
  uint64_t off[kMaxSegs + 1];
  int32_t n;
  int32_t per_seg;             // blocks per segment (the kernel's ep_copy)
};
struct HashJob {
  uint64_t a, b, counts, fp, nf, a_exp, a_lo, a_hi, b_exp, b_lo, b_hi, n_words;
  int32_t a_K, b_W, b_bits, L, X, cmode, R, per_group, block0;
};
struct GatherHashArgs {
  GatherArgs g;
  HashJob h[kMaxHash];
  int32_t nh, copy_blocks;
};
static_assert(sizeof(GatherArgs) == 408 && sizeof(HashJob) == 136 && sizeof(GatherHashArgs) == 960,
              "the launch parameters must match gather_kernel.py's structs");
using LaunchFn = int (*)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, unsigned shmem, void *stream, void **params, void **extra);

// The current cudaStream_t of stream `st`: asked of Python once per stream id (c10's CUDA stream
// table is not reachable from a CPU build of this file), then cached.
bool stream_handle(Session *s, const c10::Stream &st, void **out) {
  for (const auto &kv : *s->shandles)
    if (kv.first == st.id()) return *out = kv.second, true;
  if (!s->stream_of) return false;
  PyObject *h = PyObject_CallNoArgs(s->stream_of);
  if (!h) return PyErr_Clear(), false;
  void *p = PyLong_AsVoidPtr(h);
  Py_DECREF(h);
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  s->shandles->emplace_back(st.id(), p);
  *out = p;
  return true;
}

// A word's exponent mask, 1 and top bit replicated over a 64-bit lane (the finite check of
// format/fingerprint_gpu.py); exp 0 for dtypes it does not check.
void finite_masks(c10::ScalarType dt, uint64_t *exp, uint64_t *lo, uint64_t *hi) {
  uint64_t word = dt == at::kBFloat16 ? 0x7F80 : dt == at::kHalf ? 0x7C00 : dt == at::kFloat ? 0x7F800000 : 0;
  int bits = int(c10::elementSize(dt)) * 8;
  *exp = *lo = *hi = 0;
  for (int i = 0; word && i < 64 / bits; i++) {
    *exp |= word << (bits * i);
    *lo |= uint64_t(1) << (bits * i);
    *hi |= uint64_t(1) << (bits * i + bits - 1);
  }
}

// The hash job of a fingerprinted rows spec: x [L, X, H] or [T, H] as whole 64-bit lanes
// (contiguous, 8-byte aligned: DeepEP's shapes), its scales, its counts. False where this call's
// tensors do not fit the kernel (the Python hook then records it: same bits, slower).
bool hash_job(const ArraySpec &a, const at::Tensor &x, PyObject *const *slots, Py_ssize_t nslots,
              PyObject *result, const at::Device &dev, HashJob *h) {
  *h = HashJob{};
  int64_t H = x.size(-1), es = int64_t(x.element_size());
  if (!x.is_contiguous() || (H * es) % 8 || reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 8) return false;
  h->L = x.dim() == 3 ? int32_t(x.size(0)) : 1;
  h->X = int32_t(x.dim() == 3 ? x.size(1) : x.size(0));
  h->a = uint64_t(reinterpret_cast<uintptr_t>(x.const_data_ptr()));
  h->a_K = int32_t(H * es / 8);
  h->n_words = uint64_t(H);
  finite_masks(x.scalar_type(), &h->a_exp, &h->a_lo, &h->a_hi);
  if (a.src2.set()) {  // an FP8 pair's scales [L, X, S] / [T, S]
    PyObject *o = resolve(a.src2, slots, nslots, result);
    if (!o || !THPVariable_Check(o)) return false;
    const at::Tensor &b = THPVariable_Unpack(o);
    int64_t bs = b.defined() ? int64_t(b.element_size()) : 0;
    if (!bs || b.device() != dev || !b.is_contiguous() || b.dim() != x.dim() || (bs != 1 && bs != 2 && bs != 4) ||
        b.numel() != int64_t(h->L) * h->X * b.size(-1))
      return false;
    h->b = uint64_t(reinterpret_cast<uintptr_t>(b.const_data_ptr()));
    h->b_W = int32_t(b.size(-1));
    h->b_bits = int32_t(8 * bs);
    h->n_words += uint64_t(b.size(-1));
    finite_masks(b.scalar_type(), &h->b_exp, &h->b_lo, &h->b_hi);
  }
  if (a.mode) {  // valid rows: counts read on the device, no host sync
    PyObject *o = resolve(a.counts, slots, nslots, result);
    if (!o || !THPVariable_Check(o)) return false;
    const at::Tensor &c = THPVariable_Unpack(o);
    if (!c.defined() || c.device() != dev || !c.is_contiguous() || x.dim() != 3 || c.size(0) != h->L) return false;
    if (a.mode == 1 && c.dim() == 1 && c.scalar_type() == at::kInt) h->cmode = 1;
    else if (a.mode == 1 && c.dim() == 1 && c.scalar_type() == at::kLong) h->cmode = 3;
    else if (a.mode == 2 && c.dim() == 2 && c.scalar_type() == at::kLong) h->cmode = 2, h->R = int32_t(c.size(1));
    else return false;
    h->counts = uint64_t(reinterpret_cast<uintptr_t>(c.const_data_ptr()));
  }
  // ~2048 blocks in all: every SM busy at decode shapes, one row per block there
  int64_t per = (2048 + h->L - 1) / std::max<int32_t>(h->L, 1);
  h->per_group = int32_t(std::max<int64_t>(1, std::min<int64_t>(per, h->X)));
  return true;
}

// One cuLaunchKernel of the gather kernel: ts's bytes back to back from dst, as at::cat_out of
// their byte views would put them, and with hash jobs (`jobs`, nh of them) the fingerprinted rows
// in the same launch (epreplay_gather_hash). False (nothing launched) where the raw path does
// not apply; a failed launch turns the raw path off for the session (at::cat_out then says what
// is wrong; hashed calls go back to the Python hook).
bool raw_gather(Session *s, const std::vector<Out> &ts, HashJob *jobs, int nh, uint64_t dst, int64_t total,
                const c10::Stream &st, bool in_d, void *stream) {
  void *func = nh ? s->gfunc_hash : s->gfunc;
  if (!func || ts.size() > kMaxSegs || !in_d) return false;  // the kernel lives in D's context
  PROF(9);
  if (!stream && !stream_handle(s, st, &stream)) return false;  // (gather looked it up with a drain table)
  PROF(4);
  GatherHashArgs a;
  a.g.dst = dst;
  a.g.n = int32_t(ts.size());
  uint64_t off = 0, copied = 0, most = 0;
  for (size_t k = 0; k < ts.size(); k++) {  // hook_call made every staged array contiguous
    const Out &o = ts[k];
    if (!o.rows.empty()) return false;  // valid-row gathers are host-only (valid_rows)
    a.g.off[k] = off;
    if (o.hash_part >= 0) {
      a.g.src[k] = 0;
      (o.hash_part ? jobs[o.job].nf : jobs[o.job].fp) = off;
    } else {
      a.g.src[k] = uint64_t(reinterpret_cast<uintptr_t>(o.t.const_data_ptr()));
      copied += o.t.nbytes();
      most = std::max<uint64_t>(most, o.t.nbytes());
    }
    off += o.nbytes();
  }
  a.g.off[ts.size()] = off;  // = total
  // Blocks of its own for each segment, enough for the largest (16 bytes a thread), at most
  // kCopyBlocks in all: the segments' loads overlap instead of following one another. (gshared:
  // blocks for all the bytes, each striding over every segment.)
  uint64_t per = copied ? std::min<uint64_t>(264, std::max<uint64_t>(1, ((s->gshared ? copied : most) / 16 + 255) / 256)) : 0;
  if (!s->gshared && per * ts.size() > kCopyBlocks) per = std::max<uint64_t>(1, kCopyBlocks / ts.size());
  a.g.per_seg = s->gshared ? 0 : int32_t(per);
  unsigned copy_blocks = unsigned(s->gshared ? per : per * ts.size());
  unsigned blocks = copy_blocks;
  a.nh = 0;
  for (int j = 0; j < nh; j++) {
    if (!jobs[j].L || !jobs[j].X) continue;  // no rows: nothing to hash or write
    a.h[a.nh] = jobs[j];
    a.h[a.nh].block0 = int32_t(blocks);
    blocks += unsigned(jobs[j].L) * unsigned(jobs[j].per_group);
    a.nh++;
  }
  a.copy_blocks = int32_t(copy_blocks);
  if (!blocks) return true;
  void *params[] = {&a};  // the copy-only kernel reads the leading GatherArgs
  int rc = reinterpret_cast<LaunchFn>(s->glaunch)(func, blocks, 1, 1, 256, 1, 1, 0, stream, params, nullptr);
  PROF(5);
  if (rc) {
    s->gfunc = s->gfunc_hash = nullptr;
    return false;
  }
  return true;
}

// Whether the calling thread is in D's context (its device current): see Session::dctx.
bool in_d_context(Session *s) {
  if (s->ctx_get) {
    void *ctx = nullptr;
    return reinterpret_cast<int (*)(void **)>(s->ctx_get)(&ctx) == 0 && ctx == s->dctx;
  }
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice() == s->D->device();
}

// The side stream made to wait for the job's stream (job_h) and for DeepEP's event `after`
// (its current_stream_wait(), called with the side stream current): device_stage's `_hashed`.
bool wait_after(Session *s, void *job_h, PyObject *after) {
  using RecordFn = int (*)(void *, void *);
  using WaitFn = int (*)(void *, void *, unsigned);
  if (reinterpret_cast<RecordFn>(s->ev_record)(s->after_ev, job_h) ||
      reinterpret_cast<WaitFn>(s->wait_event)(s->side_h, s->after_ev, 0))
    return false;
  auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  c10::Stream prev = impl->exchangeStream(*s->side);
  PyObject *r = PyObject_CallMethodNoArgs(after, s_current_stream_wait);
  impl->exchangeStream(prev);
  if (!r) return PyErr_Clear(), false;
  Py_DECREF(r);
  return true;
}

// One launch: the call's CUDA arrays' bytes (and fingerprinted rows) into the next free bytes
// of D, on the current stream (device_stage.DeviceStage.gather, same reservation rules), or for
// async_finish outputs (`after`) on the side stream; their absolute position, -1 when D is full
// (dropped and counted), -2 when the raw launch could not take the call (the Python hook records
// it).
int64_t gather(Session *s, const std::vector<Out> &ts, HashJob *jobs, int nh, PyObject *after) {
  int64_t total = 0;
  for (const auto &o : ts) total += int64_t(o.nbytes());
  int64_t cap = s->D->numel(), head = s->dstate[0];
  if (!total) return head;
  int64_t off = head % cap, pad = off + total > cap ? cap - off : 0;
  if (total > cap || head + pad + total - s->dstate[1] > cap) {
    s->dstate[1] = int64_t(s->words[W_DTAIL / 8]);  // the writer's release, re-read only when full
    if (total > cap || head + pad + total - s->dstate[1] > cap) return -1;
  }
  int64_t start = head + pad;
  c10::Stream st = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(s->D->device());
  bool in_d = in_d_context(s);
  void *handle = nullptr;  // with the native drain: the stream it must wait on, noted before
  if (after && (!s->tbl || !s->side || !s->gfunc)) return -2;  // async_finish: the raw launch on the side stream
  if (s->tbl && (!in_d || !stream_handle(s, st, &handle))) return -2;
  if (after) {
    if (!epr_room(s->tbl, uintptr_t(s->side_h)) || !wait_after(s, handle, after)) return -2;
    handle = s->side_h;
    st = *s->side;
  } else if (s->tbl && !epr_room(s->tbl, uintptr_t(handle))) {
    return -2;  // the Python hook records it (and drops it where the table is full)
  }
  PROF(8);
  uint64_t dst = uint64_t(reinterpret_cast<uintptr_t>(s->D->data_ptr())) + uint64_t(start % cap);
  int64_t t0 = now_ns(CLOCK_MONOTONIC);
  if (raw_gather(s, ts, jobs, nh, dst, total, st, in_d, handle)) {
    s->glaunches[0]++;
    if (after) {  // the caching allocator must not hand the sources out again before the side reads them
      auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
      for (const auto &o : ts)
        if (o.hash_part < 0) impl->recordDataPtrOnStream(o.t.storage().data_ptr(), st);
    }
  } else if (nh || after) {
    return -2;
  } else {
    std::vector<at::Tensor> pieces;
    pieces.reserve(ts.size());
    for (const auto &o : ts) pieces.push_back(o.t.reshape({-1}).view(at::kByte));
    at::Tensor out = s->D->narrow(0, start % cap, total);
    at::cat_out(out, pieces, 0);
    s->glaunches[1]++;
  }
  s->glaunches[2] += now_ns(CLOCK_MONOTONIC) - t0;
  if (s->tbl) {  // after the launch: the drain may copy up to here from now on
    epr_advance(s->tbl, uintptr_t(handle), start + total);
    return start;
  }
  s->dstate[0] = start + total;
  bool seen = false;
  for (const auto &x : *s->streams) seen = seen || x == st;
  if (!seen) s->streams->push_back(st);
  return start;
}

// A hash spec's host rows fingerprinted here (_hosthash.h), into fp [n] and marks [n] (1: a NaN/inf
// word): x [T, H] every row, or a low-latency buffer [L, X, H] its valid rows, expert-major (counts
// from the host tensor the spec names, as valid_rows); an FP8 pair's scales at src2, any strides.
// The same two arrays the GPU launch writes, so the writer builds the same record. False where
// this call's rows do not fit (not whole aligned lanes): the Python hook records the call.
bool host_hash(const ArraySpec &a, const at::Tensor &x, PyObject *const *slots, Py_ssize_t nslots,
               PyObject *result, std::vector<int64_t> &fp, std::vector<int8_t> &marks) {
  int64_t H = x.size(-1), es = int64_t(x.element_size()), nd = x.dim();
  if (!hosthash::fast() || (H > 1 && x.stride(-1) != 1) || (H * es) % 8 ||
      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 8 || nd != (a.mode ? 3 : 2))
    return false;
  for (int64_t d = 0; d + 1 < nd; d++)
    if ((x.stride(d) * es) % 8) return false;
  hosthash::Masks am, bm;
  finite_masks(x.scalar_type(), &am.exp, &am.lo, &am.hi);
  const char *b = nullptr;
  int64_t bW = 0, bs[3] = {0, 0, 0};
  int bBytes = 0;
  if (a.src2.set()) {  // an FP8 pair's scales [T, S] / [L, X, S]
    PyObject *o = resolve(a.src2, slots, nslots, result);
    if (!o || !THPVariable_Check(o)) return false;
    const at::Tensor &bt = THPVariable_Unpack(o);
    if (!bt.defined() || !bt.is_cpu() || bt.dim() != nd) return false;
    bBytes = int(bt.element_size());
    if (bBytes != 1 && bBytes != 2 && bBytes != 4) return false;
    for (int64_t d = 0; d + 1 < nd; d++)
      if (bt.size(d) != x.size(d)) return false;
    b = static_cast<const char *>(bt.const_data_ptr());
    bW = bt.size(-1);
    for (int64_t d = 0; d < nd; d++) bs[d] = bt.stride(d) * bBytes;
    finite_masks(bt.scalar_type(), &bm.exp, &bm.lo, &bm.hi);
  }
  const char *base = static_cast<const char *>(x.const_data_ptr());
  uint64_t n_words = uint64_t(H + bW);
  int64_t aK = H * es / 8;
  auto one = [&](int64_t i, const char *arow, const char *brow) {
    uint64_t bad = 0;
    fp[i] = int64_t(hosthash::row(arow, aK, am, brow, bW, bBytes, bs[nd - 1], bm, n_words, &bad));
    marks[i] = bad != 0;
  };
  if (!a.mode) {
    int64_t T = x.size(0);
    fp.resize(size_t(T));
    marks.resize(size_t(T));
    for (int64_t t = 0; t < T; t++) one(t, base + t * x.stride(0) * es, b ? b + t * bs[0] : nullptr);
    return true;
  }
  PyObject *c = resolve(a.counts, slots, nslots, result);
  Out counted;
  if (!c || !THPVariable_Check(c) || !valid_rows(a.mode, x, THPVariable_Unpack(c), counted)) return false;
  fp.resize(size_t(counted.valid));
  marks.resize(size_t(counted.valid));
  int64_t i = 0;
  for (size_t e = 0; e < counted.rows.size(); e++)
    for (int64_t r = 0; r < counted.rows[e]; r++, i++)
      one(i, base + (int64_t(e) * x.stride(0) + r * x.stride(1)) * es,
          b ? b + int64_t(e) * bs[0] + r * bs[1] : nullptr);
  return true;
}

// A thread's arrays and values of the call its hook is writing, reused: no heap allocation per
// call once they have grown. Busy while in use: whatever runs Python in the call's tail (a
// tensor subclass's contiguous(), a hand back) and reaches a hooked call gets fresh vectors.
struct Scratch {
  std::vector<Out> ts;
  std::vector<PyObject *> vals;
  std::vector<int64_t> fp[kMaxHash];  // host_hash's outputs, per hash spec of the call
  std::vector<int8_t> marks[kMaxHash];
  uint64_t borrowed = 0;  // bit k: ts[k].t borrows its tensor (below)
  bool busy = false;

  // ts gets `t` without a reference of its own: the argument or the result it came from holds
  // t for the whole call. A reference would cost more than the rest of the array's handling:
  // taking a second one on a tensor that only its Python object holds increfs that object
  // through a virtual call (c10 intrusive_ptr's PyObject preservation), and letting it go
  // decrefs it again (~0.25 us a tensor on a cold cache).
  void borrow(Out &out, const at::Tensor &t) {
    size_t k = size_t(&out - ts.data());
    if (k >= 64) {
      out.t = t;
      return;
    }
    out.t = c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t);
    borrowed |= uint64_t(1) << k;
  }
  void clear() {  // the borrowed tensors are given back unreleased, then everything goes
    for (size_t k = 0; borrowed && k < ts.size() && k < 64; k++)
      if (borrowed >> k & 1) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(ts[k].t);
    borrowed = 0;
    ts.clear();
    vals.clear();
  }
};
thread_local Scratch t_scratch;

struct ScratchUse {  // marks a Scratch busy; at the end drops the tensors it holds
  Scratch &sc;
  explicit ScratchUse(Scratch &s) : sc(s) { sc.busy = true; }
  ~ScratchUse() {
    sc.clear();
    sc.busy = false;
  }
};

// A composite value's list for this call (held: released with the frame's Held); nullptr where a
// source is missing or not an int.
PyObject *int_list(const ValueSpec &v, PyObject *const *slots, Py_ssize_t nslots, PyObject *result) {
  PyObject *list = PyList_New(Py_ssize_t(v.ints.size()));
  if (!list) return PyErr_Clear(), nullptr;
  t_held.push_back(list);
  for (size_t k = 0; k < v.ints.size(); k++) {
    const IntElem &e = v.ints[k];
    int64_t x = e.c;
    if (e.kind != 2) {
      PyObject *o = resolve(e.src, slots, nslots, result);
      if (!o) return nullptr;
      if (e.kind == 1) {
        int t = PyObject_IsTrue(o);
        if (t < 0) return PyErr_Clear(), nullptr;
        x = t;
      } else {
        if (!PyLong_Check(o)) return nullptr;
        x = PyLong_AsLongLong(o);
        if (x == -1 && PyErr_Occurred()) return PyErr_Clear(), nullptr;
      }
    }
    PyObject *n = PyLong_FromLongLong(x);
    if (!n) return PyErr_Clear(), nullptr;
    PyList_SET_ITEM(list, Py_ssize_t(k), n);
  }
  return list;
}

// A call's staged arrays and values by its plan (or a recv hook's outputs by the plan's `end`:
// no argument slots), gathered on a GPU, then its FAST frame of `part`: 1 written, 0 dropped
// (counted), -1 not shaped as learned (the caller hands the call to the Python path). tokens_io:
// the tokens when the plan has no source for them; the call's tokens on return.
int stage_write(Session *s, const Plan &p, const InFlight &f, PyObject *const *slots, Py_ssize_t nslots,
                PyObject *result, int64_t *tokens_io, int64_t duration, int64_t parity, int64_t dseq,
                uint32_t part) {
  Held held;  // what attribute sources read: released after the frame (declared first: goes last)
  Scratch own, &sc = t_scratch.busy ? own : t_scratch;  // own: a call nested in this one's tail
  ScratchUse use(sc);
  std::vector<Out> &ts = sc.ts;
  std::vector<PyObject *> &vals = sc.vals;
  ts.reserve(p.arrays.size() + kMaxHash);
  HashJob jobs[kMaxHash];
  int nh = 0;
  bool ok = true;
  for (const auto &a : p.arrays) {
    PyObject *o = resolve(a.src, slots, nslots, result);
    if (!o || !THPVariable_Check(o)) { ok = false; break; }
    const at::Tensor &t = THPVariable_Unpack(o);
    if (!t.defined() || t.scalar_type() != a.dtype || t.dim() != a.ndim ||
        (p.device ? t.device() != s->D->device() : !t.is_cpu())) { ok = false; break; }
    if (a.hash) {  // fingerprinted rows: fp [n] and marks [n] in the frame, the rows not staged
      // host rows are hashed here (host_hash); CUDA rows by the gather launch (hash_job)
      bool got = nh < int(kMaxHash) && (p.device ? hash_job(a, t, slots, nslots, result, s->D->device(), &jobs[nh])
                                                 : host_hash(a, t, slots, nslots, result, sc.fp[nh], sc.marks[nh]));
      if (!got) {
        ok = false;
        break;
      }
      Out fp, marks;
      fp.hash_part = 0, marks.hash_part = 1;
      fp.job = marks.job = nh;
      if (p.device) {
        fp.t = t;  // held until the launch
        fp.n = marks.n = int64_t(jobs[nh].L) * jobs[nh].X;
      } else {
        fp.n = marks.n = int64_t(sc.fp[nh].size());
        fp.host = sc.fp[nh].data(), marks.host = sc.marks[nh].data();
      }
      nh++;
      ts.push_back(std::move(fp));
      ts.push_back(std::move(marks));
      continue;
    }
    Out &out = ts.emplace_back();  // in ts from the start: sc.clear() gives a borrow back
    try {
      if (t.is_contiguous()) sc.borrow(out, t);
      else out.t = t.contiguous();
    } catch (const std::exception &) {
      ok = false;
      break;
    }
    if (a.mode) {
      PyObject *c = resolve(a.counts, slots, nslots, result);
      if (!c || !THPVariable_Check(c) || !valid_rows(a.mode, out.t, THPVariable_Unpack(c), out)) { ok = false; break; }
    }
  }
  for (size_t i = 0; ok && i < p.values.size(); i++) {
    PyObject *o = p.values[i].composite ? int_list(p.values[i], slots, nslots, result)
                                        : resolve(p.values[i].src, slots, nslots, result);
    if (!o || !PyList_CheckExact(o)) { ok = false; break; }
    for (Py_ssize_t k = 0; ok && k < PyList_GET_SIZE(o); k++) ok = PyLong_CheckExact(PyList_GET_ITEM(o, k));
    vals.push_back(o);
  }
  int64_t tokens = *tokens_io;
  if (ok && p.tokens_src.set()) {
    PyObject *o = resolve(p.tokens_src, slots, nslots, result);
    tokens = 0;
    if (o && THPVariable_Check(o)) {
      const at::Tensor &t = THPVariable_Unpack(o);
      tokens = t.defined() && t.dim() ? t.size(0) : 0;
    }
  }
  if (ok && p.remember.set()) {
    PyObject *o = resolve(p.remember, slots, nslots, result);
    if (o && THPVariable_Check(o)) lineage_put(s, THPVariable_Unpack(o), f.seq);
  }
  ok = ok && !s->state[3];  // a Python writer is mid-frame (the watchdog's): Python writes this one
  int64_t dev_start = -1;
  PROF(3);
  if (ok && p.device) {
    try {
      PyObject *after = p.after.set() ? resolve(p.after, slots, nslots, result) : nullptr;
      dev_start = p.after.set() && !after ? -2 : gather(s, ts, jobs, nh, after);
    } catch (const std::exception &) {  // a torch error: Python's path says what it is
      ok = false;
    }
    ok = ok && dev_start != -2;  // hashed rows the raw launch could not take, no stream handle: Python's
    PROF(6);
  }
  *tokens_io = tokens;
  if (ok && p.device && dev_start < 0) {
    s->words[W_DROPPED] += 1;  // D is full: dropped and counted, the job goes on
    s->stats[2] += 1;
    return 0;
  }
  if (!ok) return -1;
  return write_fast(s, p, f, tokens, duration, parity, dseq, ts, vals, slots, nslots, dev_start, part) ? 1 : 0;
}

PyObject *wrap_recv(Session *s, const Plan &p, const InFlight &f, PyObject *bs, PyObject *result,
                    int64_t tokens, int64_t duration);  // below

PyObject *hook_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
  Hook *h = reinterpret_cast<Hook *>(self);
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  Session *s = g_sess;
  if (t_depth || nargs < 1) return PyObject_Vectorcall(h->orig, args, nargsf, kwnames);
  if (!s || !s->enabled) return call_through(h->slow, args, nargsf, kwnames);
  int64_t t_in = now_ns(CLOCK_MONOTONIC);
  PROF_START();
  PyObject *buf = args[0];
  PyObject *const *slots = args + 1;  // the arguments after self: positional, then keyword values
  Py_ssize_t npos = nargs - 1, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, nslots = npos + nkw;
  for (int i = 0; i < 4; i++) __builtin_prefetch(reinterpret_cast<const char *>(h->seen_key) + 64 * i);
  BufInfo *bi = h->seen_bi;
  if (h->seen_bgen != g_plans_changed || h->seen_buf != buf || PyWeakref_GET_OBJECT(h->seen_wr) != buf) {
    bi = buffer_info(s, buf);
    if (!bi) return call_through(h->slow, args, nargsf, kwnames);
    PyObject *wr = PyWeakref_NewRef(buf, nullptr);  // a Buffer type without weak references: looked up each call
    if (wr) {
      Py_XSETREF(h->seen_wr, wr);
      h->seen_buf = buf, h->seen_bi = bi, h->seen_bgen = g_plans_changed;
    } else {
      PyErr_Clear();
    }
  }
  int64_t m_step, m_layer;
  bool tags;
  bool marked = read_marks(s, &m_step, &m_layer, &tags);
  if (!marked) PyErr_Clear();  // the Python path below reads the marks itself
  // a dispatch with token tags has its own plan (one more array, the tags: root 2)
  bool tagged = marked && tags && (h->op == OP_DISPATCH || h->op == OP_LL_DISPATCH);
  Key &key = t_key;  // reused: no allocation per call (nested hooked calls pass through above)
  key.v.clear();
  key.v.push_back(h->op);
  key.v.push_back(bi->id);
  key.v.push_back(npos);
  if (tagged) key.v.push_back(kTaggedKey);
  for (Py_ssize_t k = 0; k < nkw; k++) key.v.push_back(PyObject_Hash(PyTuple_GET_ITEM(kwnames, k)));
  for (Py_ssize_t i = 0; i < nslots; i++) key_of(slots[i], key.v);
  const Plan *plan;
  bool known;  // the key was seen: its plan, or null (always the Python path)
  size_t kn = key.v.size();
  if (h->seen_gen == g_plans_changed && size_t(h->seen_len) == kn &&
      memcmp(h->seen_key, key.v.data(), kn * sizeof(int64_t)) == 0) {
    plan = h->seen_plan, known = true;
  } else {
    auto found = s->plans->find(key);
    known = found != s->plans->end();
    plan = known ? found->second : nullptr;
    if (plan && kn <= size_t(kKeyCached)) {
      h->seen_gen = g_plans_changed, h->seen_plan = plan, h->seen_len = int(kn);
      memcpy(h->seen_key, key.v.data(), kn * sizeof(int64_t));
    }
  }
  if (!plan || !marked) {
    PyErr_Clear();
    t_depth++;
    PyObject *r = slow_path(h, args, nargsf, kwnames, known ? nullptr : &key);
    t_depth--;
    return r;
  }
  const Plan &p = *plan;
  PROF(0);
  PyObject *took = nullptr;
  if ((p.device && (!s->D || (s->capturing && *s->capturing))) ||  // a CUDA graph is being captured
      (tagged && !(took = take_tags(s)))) {                           // tags only Python converts
    t_depth++;
    PyObject *r = slow_path(h, args, nargsf, kwnames, nullptr);
    t_depth--;
    return r;
  }
  TagsHold hold(took);
  InFlight f{};
  f.call_id = s->next_id++;
  f.hook = h;
  f.op = p.op;
  f.buffer = bi->id;
  f.seq = bi->cnt[0]++;
  s->stats[1] += 1;
  attribute(s, p.op, m_step, m_layer, &f.step, &f.layer);
  int64_t parity = -1, dseq = -1;
  if (p.parity) parity = bi->cnt[1]++ % 2;
  if (p.lookup.set()) {
    Held held;
    PyObject *ht = resolve(p.lookup, slots, nslots, nullptr);
    if (ht && THPVariable_Check(ht)) dseq = lineage_get(s, THPVariable_Unpack(ht));
  }
  f.start_ns = now_ns(CLOCK_REALTIME);
  f.parity = parity;
  f.args = args;
  f.nargs = size_t(nargs);
  f.kwnames = kwnames;
  f.tags = took;
  // in flight: the watchdog (hung()) sees it until it returns
  f.next = s->inflight.next;
  f.prev = &s->inflight;
  s->inflight.next->prev = &f;
  s->inflight.next = &f;
  Py_INCREF(s);  // the session may be closed while the call runs
  f.mono_ns = now_ns(CLOCK_MONOTONIC);
  s->stats[0] += f.mono_ns - t_in;
  PROF(1);
  PyObject *result = call_through(h->orig, args, nargsf, kwnames);
  int64_t t_out = now_ns(CLOCK_MONOTONIC);
  PROF(2);
  int64_t duration = t_out - f.mono_ns;
  f.prev->next = f.next;
  f.next->prev = f.prev;
  if (!s->enabled) {
    Py_DECREF(s);
    return result;
  }
  if (!result) {  // raised: an ERROR record, written by Python (rare), then the same exception
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    Py_XDECREF(hand_back(s, s_fast_raised, f, bi->state, duration, args, nargs, kwnames, ev ? ev : Py_None));
    PyErr_Restore(et, ev, tb);
    Py_DECREF(s);
    return nullptr;
  }
  // Outputs as learned? Then the frame; else the Python path writes it from this identity.
  // A call with a recv hook: its inputs now (FAST_BEGIN), its outputs when the job calls the
  // hook, which the result then holds wrapped (RecvHook)
  const bool recv = p.end && PyTuple_Check(result) && PyTuple_GET_SIZE(result) > p.hook_at &&
                    PyCallable_Check(PyTuple_GET_ITEM(result, p.hook_at));
  int64_t tokens = p.tokens;
  int wrote = p.end && !recv ? -1
                             : stage_write(s, p, f, slots, nslots, result, &tokens, duration, parity, dseq,
                                           recv ? PART_BEGIN : PART_CALL);
  if (wrote < 0) {
    PyObject *got = hand_back(s, s_fast_mismatch, f, bi->state, duration, args, nargs, kwnames, result);
    if (got && p.end && PyTuple_Check(got)) std::swap(got, result);  // the hook wrapped by Python
    Py_XDECREF(got);
  } else if (wrote > 0 && recv) {
    PyObject *wrapped = wrap_recv(s, p, f, bi->state, result, tokens, duration);
    if (wrapped) Py_SETREF(result, wrapped);
    else PyErr_Clear();  // no memory for the wrapper: the job gets its hook, the outputs are lost
  }
  s->stats[0] += now_ns(CLOCK_MONOTONIC) - t_out;
  PROF(7);
  Py_DECREF(s);
  return result;
}

// --- RecvHook: a compiled call's recv hook -----------------------------------------------------
// Stands in for the hook a low-latency call returned (DeepEP's, held): calling it calls that,
// then writes the call's outputs (FAST_END, joined to its FAST_BEGIN by call id) from the result
// it holds, once. recorder._wrap_recv_hook is the Python path's.
struct RecvHook {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject *hook, *result, *bs, *owner;  // DeepEP's hook, the call's result, its BufferState, its Hook
  Session *s;
  const Plan *end;  // the session's (plans replaced by a learn are retired, not freed, while it lives)
  InFlight f;       // the call's identity (no arguments: the outputs come from the result)
  int64_t tokens, duration;
  bool done;
};

PyObject *s_fast_end;

PyObject *recv_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
  RecvHook *w = reinterpret_cast<RecvHook *>(self);
  PyObject *out = PyObject_Vectorcall(w->hook, args, nargsf, kwnames);
  Session *s = w->s;
  if (!out || w->done || !s->enabled || s != g_sess) return out;  // (raised: no outputs, as in Python)
  w->done = true;
  int64_t t0 = now_ns(CLOCK_MONOTONIC);
  PROF_MARK();
  const Plan &e = *w->end;
  int64_t tokens = w->tokens;
  int wrote = e.device && (!s->D || (s->capturing && *s->capturing))
                  ? -1
                  : stage_write(s, e, w->f, nullptr, 0, w->result, &tokens, w->duration, -1, -1, PART_END);
  if (wrote < 0) {  // not shaped as learned: the Python path writes the END
    PyObject *ident = identity(w->f, w->bs, w->duration);
    PyObject *r = ident ? PyObject_CallMethodObjArgs(s->rec, s_fast_end, ident, w->result, nullptr) : nullptr;
    if (!r) PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(ident);
  }
  s->stats[0] += now_ns(CLOCK_MONOTONIC) - t0;
  PROF(7);
  return out;
}

void recv_dealloc(PyObject *self) {
  RecvHook *w = reinterpret_cast<RecvHook *>(self);
  Py_XDECREF(w->hook);
  Py_XDECREF(w->result);
  Py_XDECREF(w->bs);
  Py_XDECREF(w->owner);
  Py_XDECREF(reinterpret_cast<PyObject *>(w->s));
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject RecvHookType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// The result with its recv hook (element p.hook_at) wrapped in a RecvHook; nullptr on no memory.
PyObject *wrap_recv(Session *s, const Plan &p, const InFlight &f, PyObject *bs, PyObject *result,
                    int64_t tokens, int64_t duration) {
  Py_ssize_t n = PyTuple_GET_SIZE(result);
  PyObject *out = PyTuple_New(n);
  RecvHook *w = out ? PyObject_New(RecvHook, &RecvHookType) : nullptr;
  if (!w) {
    Py_XDECREF(out);
    return nullptr;
  }
  w->vectorcall = recv_call;
  w->hook = PyTuple_GET_ITEM(result, p.hook_at);
  w->result = result;
  w->bs = bs;
  w->owner = reinterpret_cast<PyObject *>(f.hook);
  w->s = s;
  Py_INCREF(w->hook);
  Py_INCREF(result);
  Py_INCREF(bs);
  Py_INCREF(w->owner);
  Py_INCREF(reinterpret_cast<PyObject *>(s));
  w->end = p.end;
  w->f = f;
  w->f.next = w->f.prev = nullptr;
  w->f.args = nullptr;
  w->f.nargs = 0;
  w->f.kwnames = nullptr;
  w->f.tags = nullptr;  // (released when the dispatch's hook returned)
  w->tokens = tokens;
  w->duration = duration;
  w->done = false;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *v = i == p.hook_at ? reinterpret_cast<PyObject *>(w) : PyTuple_GET_ITEM(result, i);
    if (i != p.hook_at) Py_INCREF(v);
    PyTuple_SET_ITEM(out, i, v);
  }
  return out;
}

// --- Hook type ---------------------------------------------------------------------------------
PyObject *hook_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
  PyObject *orig, *slow;
  int op;
  if (!PyArg_ParseTuple(args, "OOi", &orig, &slow, &op)) return nullptr;
  Hook *h = reinterpret_cast<Hook *>(type->tp_alloc(type, 0));
  if (!h) return nullptr;
  Py_INCREF(orig);
  Py_INCREF(slow);
  h->orig = orig;
  h->slow = slow;
  h->op = op;
  h->dict = nullptr;
  h->seen_gen = h->seen_bgen = 0;  // nothing remembered
  h->seen_plan = nullptr;
  h->seen_buf = h->seen_wr = nullptr;
  h->seen_bi = nullptr;
  h->vectorcall = hook_call;
  return reinterpret_cast<PyObject *>(h);
}

void hook_dealloc(PyObject *self) {
  Hook *h = reinterpret_cast<Hook *>(self);
  Py_XDECREF(h->orig);
  Py_XDECREF(h->slow);
  Py_XDECREF(h->dict);
  Py_XDECREF(h->seen_wr);
  Py_TYPE(self)->tp_free(self);
}

PyObject *hook_get(PyObject *self, PyObject *obj, PyObject *) {
  if (!obj || obj == Py_None) {
    Py_INCREF(self);
    return self;
  }
  return PyMethod_New(self, obj);
}

PyGetSetDef hook_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject HookType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- Session type ------------------------------------------------------------------------------
PyObject *sess_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
  PyObject *rec, *state, *attr, *stats, *marks_local;
  unsigned long long base, words, cap;
  long long lps;
  if (!PyArg_ParseTuple(args, "OOKKKOOLO", &rec, &state, &base, &words, &cap, &attr, &stats, &lps,
                        &marks_local))
    return nullptr;
  Session *s = reinterpret_cast<Session *>(type->tp_alloc(type, 0));
  if (!s) return nullptr;
  if (PyObject_GetBuffer(state, &s->state_v, PyBUF_WRITABLE) < 0) goto fail;
  if (PyObject_GetBuffer(attr, &s->attr_v, PyBUF_WRITABLE) < 0) goto fail_state;
  if (PyObject_GetBuffer(stats, &s->stats_v, PyBUF_WRITABLE) < 0) goto fail_attr;
  if (s->state_v.len < 32 || s->attr_v.len < 32 || s->stats_v.len < 32) {
    PyErr_SetString(PyExc_ValueError, "state: 4 uint64, attr: 4 int64, stats: 4 int64");
    PyBuffer_Release(&s->stats_v);
    goto fail_attr;
  }
  Py_INCREF(rec);
  Py_INCREF(marks_local);
  s->rec = rec;
  s->marks_local = marks_local;
  s->views = nullptr;
  s->state = static_cast<uint64_t *>(s->state_v.buf);
  s->attr = static_cast<int64_t *>(s->attr_v.buf);
  s->stats = static_cast<int64_t *>(s->stats_v.buf);
  s->words = reinterpret_cast<volatile uint64_t *>(uintptr_t(words));
  s->base = reinterpret_cast<char *>(uintptr_t(base));
  s->cap = cap;
  s->layers_per_step = lps;
  s->enabled = true;
  s->next_id = 1ULL << 48;  // apart from the Python path's call ids
  s->plans = new std::unordered_map<Key, Plan *, KeyHash>();
  s->bufs = new std::unordered_map<PyObject *, BufInfo>();
  s->lineage = new LineageTable();
  s->inflight.next = s->inflight.prev = &s->inflight;
  s->D = nullptr;
  s->dstate = s->capturing = nullptr;
  s->streams = new std::vector<c10::Stream>();
  s->gfunc = s->glaunch = s->gfunc_hash = nullptr;
  s->stream_of = nullptr;
  s->drainer = nullptr;
  s->tbl = nullptr;
  s->dctx = s->ctx_get = nullptr;
  s->side = nullptr;
  s->side_h = s->after_ev = s->ev_record = s->wait_event = nullptr;
  s->state5 = s->state_v.len >= 40;
  s->shandles = new std::vector<std::pair<int64_t, void *>>();
  s->retired = new std::vector<Plan *>();
  s->glaunches[0] = s->glaunches[1] = s->glaunches[2] = 0;
  return reinterpret_cast<PyObject *>(s);
fail_attr:
  PyBuffer_Release(&s->attr_v);
fail_state:
  PyBuffer_Release(&s->state_v);
fail:
  s->plans = nullptr;
  Py_TYPE(s)->tp_free(reinterpret_cast<PyObject *>(s));
  return nullptr;
}

void sess_clear_maps(Session *s) {
  g_plans_changed++;
  if (s->plans) {
    for (auto &kv : *s->plans) delete kv.second;
    s->plans->clear();
  }
  if (s->bufs) {
    for (auto &kv : *s->bufs) {
      PyBuffer_Release(&kv.second.view);
      Py_DECREF(kv.second.state);
    }
    s->bufs->clear();
  }
  if (s->lineage) s->lineage->clear();
}

void sess_dealloc(PyObject *self) {
  Session *s = reinterpret_cast<Session *>(self);
  if (s->plans) {
    sess_clear_maps(s);
    delete s->plans;
    delete s->bufs;
    delete s->lineage;
    delete s->streams;
    delete s->shandles;
    for (Plan *p : *s->retired) delete p;
    delete s->retired;
    Py_XDECREF(s->stream_of);
    Py_XDECREF(s->drainer);
    delete s->side;
    if (s->D) {
      delete s->D;
      PyBuffer_Release(&s->dstate_v);
      PyBuffer_Release(&s->capt_v);
    }
    PyBuffer_Release(&s->state_v);
    PyBuffer_Release(&s->attr_v);
    PyBuffer_Release(&s->stats_v);
    Py_XDECREF(s->rec);
    Py_XDECREF(s->marks_local);
  }
  Py_TYPE(self)->tp_free(self);
}

// A Src from (root, i, j) or (root, i, j, attribute name); None: unset.
bool parse_src(PyObject *o, Src *out) {
  if (o == Py_None) return true;
  int root, i, j;
  PyObject *name = nullptr;
  if (!PyArg_ParseTuple(o, "iii|U", &root, &i, &j, &name)) return false;
  *out = Src{root, i, j, nullptr};
  if (name) {  // interned and kept: a handful of field names for the process's life
    Py_INCREF(name);
    PyUnicode_InternInPlace(&name);
    out->attr = name;
  }
  return true;
}

// A value: a Src, or ("ints", [("int" | "bool", src) | ("const", n)]).
bool parse_value(PyObject *o, ValueSpec *out) {
  PyObject *tag, *elems;
  if (PyTuple_Check(o) && PyTuple_GET_SIZE(o) == 2 && PyUnicode_Check(PyTuple_GET_ITEM(o, 0))) {
    if (!PyArg_ParseTuple(o, "UO!", &tag, &PyList_Type, &elems)) return false;
    out->composite = true;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(elems); k++) {
      PyObject *kind, *v;
      if (!PyArg_ParseTuple(PyList_GET_ITEM(elems, k), "UO", &kind, &v)) return false;
      IntElem e;
      if (PyUnicode_CompareWithASCIIString(kind, "const") == 0) {
        e.kind = 2;
        e.c = PyLong_AsLongLong(v);
        if (e.c == -1 && PyErr_Occurred()) return false;
      } else {
        e.kind = PyUnicode_CompareWithASCIIString(kind, "bool") == 0 ? 1 : 0;
        if (!parse_src(v, &e.src)) return false;
      }
      out->ints.push_back(e);
    }
    return true;
  }
  return parse_src(o, &out->src);
}

// A plan's arrays [(src, torch dtype, ndim, mode, counts src[, hash, scales src])] and values
// [src] into p; false with a Python error set.
bool parse_part(PyObject *arrays, PyObject *values, Plan *p) {
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arrays); i++) {
    PyObject *src, *dt, *counts, *src2 = Py_None;
    int ndim, mode, hash = 0;
    ArraySpec a;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(arrays, i), "OOiiO|pO", &src, &dt, &ndim, &mode, &counts, &hash, &src2) ||
        !parse_src(src, &a.src) || !parse_src(counts, &a.counts) || !parse_src(src2, &a.src2) ||
        !THPDtype_Check(dt)) {
      if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError,
                        "learn: arrays are (src, torch.dtype, ndim, mode, counts src[, hash, scales src])");
      return false;
    }
    a.dtype = reinterpret_cast<THPDtype *>(dt)->scalar_type;
    a.ndim = ndim;
    a.mode = mode;
    a.hash = hash;
    p->total_dims += hash ? 2 : mode ? ndim - 1 : ndim;  // hashed: fp [n] and marks [n]; mode: [V(, H)]
    p->arrays.push_back(a);
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(values); i++) {
    ValueSpec v;
    if (!parse_value(PyList_GET_ITEM(values, i), &v)) return false;
    p->values.push_back(std::move(v));
  }
  return true;
}

// A key as pending() gave it (bytes of its int64 words).
void key_from_bytes(PyObject *b, Key *key) {
  Py_ssize_t n = PyBytes_GET_SIZE(b) / Py_ssize_t(sizeof(int64_t));
  key->v.resize(size_t(n));
  memcpy(key->v.data(), PyBytes_AS_STRING(b), size_t(n) * sizeof(int64_t));
}

// learn(spec[, key]): a plan for the key of the call this thread's Python path is handling, or
// for `key` (pending()'s bytes: a recv hook's call, learned when its hook ran; a key learned
// since keeps its plan).
// spec = (plan id, op, parity, lookup src|None, remember src|None, tokens src|None, tokens,
//         argument dims, [(src, torch dtype, ndim, ...)], [value (parse_value)], device, after src|None[,
//         (hook index, [arrays], [value srcs], device): the outputs' part]); None: that key
//         always takes the Python path.
PyObject *sess_learn(PyObject *self, PyObject *args) {
  Session *s = reinterpret_cast<Session *>(self);
  PyObject *spec, *key_bytes = nullptr;
  if (!PyArg_ParseTuple(args, "O|S", &spec, &key_bytes)) return nullptr;
  Key key;
  if (key_bytes) {
    key_from_bytes(key_bytes, &key);
    if (s->plans->count(key)) Py_RETURN_FALSE;
  } else if (!t_pending.active) {
    Py_RETURN_FALSE;
  }
  Plan *p = nullptr;
  if (spec != Py_None) {
    p = new Plan();
    unsigned int id;
    int op, parity, arg_dims, device;
    long long tokens;
    PyObject *lookup, *remember, *tokens_src, *arrays, *values, *after = Py_None, *end = Py_None;
    if (!PyArg_ParseTuple(spec, "IipOOOLiO!O!p|OO", &id, &op, &parity, &lookup, &remember, &tokens_src, &tokens,
                          &arg_dims, &PyList_Type, &arrays, &PyList_Type, &values, &device, &after, &end) ||
        !parse_src(lookup, &p->lookup) || !parse_src(remember, &p->remember) ||
        !parse_src(tokens_src, &p->tokens_src) || !parse_src(after, &p->after) || !parse_part(arrays, values, p)) {
      delete p;
      return nullptr;
    }
    p->id = id;
    p->op = op;
    p->parity = parity;
    p->tokens = tokens;
    p->arg_dims = arg_dims;
    p->device = device;
    if (end != Py_None) {
      Plan *e = p->end = new Plan();
      PyObject *e_arrays, *e_values;
      int e_device;
      if (!PyArg_ParseTuple(end, "iO!O!p", &p->hook_at, &PyList_Type, &e_arrays, &PyList_Type, &e_values, &e_device) ||
          !parse_part(e_arrays, e_values, e) || p->hook_at < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "learn: a negative hook index");
        delete p;
        return nullptr;
      }
      e->id = id;
      e->op = op;
      e->device = e_device;
    }
  }
  g_plans_changed++;
  const Key &k = key_bytes ? key : t_pending.key;
  auto it = s->plans->find(k);
  if (it != s->plans->end()) {
    if (it->second) s->retired->push_back(it->second);
    it->second = p;
  } else {
    (*s->plans)[k] = p;
  }
  if (!key_bytes) t_pending.active = false;
  Py_RETURN_TRUE;
}

// pending(): (hook, positional count, keyword names, tags taken, key bytes) of the call this
// thread's Python path is handling when the compiled hook asked it to learn a plan; else None.
PyObject *sess_pending(PyObject *, PyObject *) {
  if (!t_pending.active) Py_RETURN_NONE;
  const auto &k = t_pending.key.v;  // [op, buffer, npos, kTaggedKey if the call takes tags, ...]
  return Py_BuildValue("(OnOOy#)", reinterpret_cast<PyObject *>(t_pending.hook), t_pending.nargs,
                       t_pending.kwnames ? t_pending.kwnames : Py_None,
                       k.size() > 3 && k[3] == kTaggedKey ? Py_True : Py_False,
                       reinterpret_cast<const char *>(k.data()), Py_ssize_t(k.size() * sizeof(int64_t)));
}

// hung(now_mono_ns, timeout_ns): fast calls running longer, not reported yet (then marked):
// [(identity, args tuple, kwargs dict)], identity as for _fast_raised (duration -1).
PyObject *sess_hung(PyObject *self, PyObject *args) {
  Session *s = reinterpret_cast<Session *>(self);
  long long now, timeout;
  if (!PyArg_ParseTuple(args, "LL", &now, &timeout)) return nullptr;
  PyObject *out = PyList_New(0);
  for (InFlight *f = s->inflight.next; out && f != &s->inflight; f = f->next) {
    if (f->reported || now - f->mono_ns <= timeout) continue;
    PyObject *buf = f->args[0];
    PyObject *bs = PyObject_GetAttr(buf, s_epreplay_capture);
    if (!bs) {
      PyErr_Clear();
      continue;
    }
    Py_ssize_t nargs = Py_ssize_t(PyVectorcall_NARGS(f->nargs));
    PyObject *ident = identity(*f, bs, -1);
    PyObject *a = args_tuple(f->args, nargs), *kw = kwargs_dict(f->args + 1, nargs - 1, f->kwnames);
    Py_DECREF(bs);
    PyObject *item = (ident && a && kw) ? PyTuple_Pack(3, ident, a, kw) : nullptr;
    Py_XDECREF(ident);
    Py_XDECREF(a);
    Py_XDECREF(kw);
    if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
    Py_XDECREF(item);
    f->reported = true;
  }
  return out;
}

PyObject *sess_lineage_put(PyObject *self, PyObject *args) {
  PyObject *t;
  long long seq;
  if (!PyArg_ParseTuple(args, "OL", &t, &seq)) return nullptr;
  if (THPVariable_Check(t)) lineage_put(reinterpret_cast<Session *>(self), THPVariable_Unpack(t), seq);
  Py_RETURN_NONE;
}

PyObject *sess_lineage_get(PyObject *self, PyObject *t) {
  if (!THPVariable_Check(t)) return PyLong_FromLong(-1);
  return PyLong_FromLongLong(lineage_get(reinterpret_cast<Session *>(self), THPVariable_Unpack(t)));
}

// set_device(D, dstate, capturing[, drainer, stream_of, ctx, ctx_get, side]): a GPU session's
// device ring (uint8 [cap] on the device), its host state array('q', [head, release seen]) and
// graph_ring's capture count array('q', [n]); with the native drain (_drainc.Drainer, None: the
// Python drain) a callable giving the current cudaStream_t (the streams it notes are raw
// handles); D's CUcontext and cuCtxGetCurrent's address (0: the device check goes through c10);
// side: device_stage.DeviceStage.side_spec() (None: async_finish outputs stay Python's).
PyObject *sess_set_device(PyObject *self, PyObject *args) {
  Session *s = reinterpret_cast<Session *>(self);
  PyObject *D, *dstate, *capt, *drainer = Py_None, *stream_of = Py_None, *side = Py_None;
  unsigned long long ctx = 0, ctx_get = 0;
  if (!PyArg_ParseTuple(args, "OOO|OOKKO", &D, &dstate, &capt, &drainer, &stream_of, &ctx, &ctx_get, &side))
    return nullptr;
  if (s->D) Py_RETURN_NONE;  // once a session
  if (side != Py_None) {  // (stream id, device index, device type, cudaStream_t, CUevent, cuEventRecord, cuStreamWaitEvent)
    long long sid;
    int didx, dtype;
    unsigned long long sh, ev, rec, wait;
    if (!PyArg_ParseTuple(side, "LiiKKKK", &sid, &didx, &dtype, &sh, &ev, &rec, &wait)) return nullptr;
    if (sh && ev && rec && wait) {
      s->side = new c10::Stream(c10::Stream::unpack3(sid, c10::DeviceIndex(didx), c10::DeviceType(dtype)));
      s->side_h = reinterpret_cast<void *>(uintptr_t(sh));
      s->after_ev = reinterpret_cast<void *>(uintptr_t(ev));
      s->ev_record = reinterpret_cast<void *>(uintptr_t(rec));
      s->wait_event = reinterpret_cast<void *>(uintptr_t(wait));
    }
  }
  if (ctx && ctx_get) {
    s->dctx = reinterpret_cast<void *>(uintptr_t(ctx));
    s->ctx_get = reinterpret_cast<void *>(uintptr_t(ctx_get));
  }
  if (!THPVariable_Check(D)) {
    PyErr_SetString(PyExc_TypeError, "set_device: D must be a tensor");
    return nullptr;
  }
  if (drainer != Py_None) {
    if (!PyCallable_Check(stream_of)) {
      PyErr_SetString(PyExc_TypeError, "set_device: a drainer needs stream_of, a callable");
      return nullptr;
    }
    PyObject *addr = PyObject_CallMethod(drainer, "table", nullptr);
    if (!addr) return nullptr;
    void *tbl = PyLong_AsVoidPtr(addr);
    Py_DECREF(addr);
    if (!tbl) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "set_device: the drainer has no table");
      return nullptr;
    }
    s->tbl = static_cast<epr_streams *>(tbl);
    Py_INCREF(drainer);
    Py_XSETREF(s->drainer, drainer);
    if (!s->stream_of) {
      Py_INCREF(stream_of);
      s->stream_of = stream_of;
    }
  }
  if (PyObject_GetBuffer(dstate, &s->dstate_v, PyBUF_WRITABLE) < 0) return nullptr;
  if (PyObject_GetBuffer(capt, &s->capt_v, PyBUF_WRITABLE) < 0) {
    PyBuffer_Release(&s->dstate_v);
    return nullptr;
  }
  s->dstate = static_cast<int64_t *>(s->dstate_v.buf);
  s->capturing = static_cast<int64_t *>(s->capt_v.buf);
  s->D = new at::Tensor(THPVariable_Unpack(D));
  if (s->side) s->shandles->emplace_back(s->side->id(), s->side_h);  // raw_gather's lookup of it
  Py_RETURN_NONE;
}

// set_gather(func, launch, stream_of[, func_hash]): the raw gather launch (gather_kernel.py): the
// kernels' CUfunctions (the copies; the copies with fingerprinted rows, 0: none) and
// cuLaunchKernel as addresses, and a callable giving the current cudaStream_t.
PyObject *sess_set_gather(PyObject *self, PyObject *args) {
  Session *s = reinterpret_cast<Session *>(self);
  unsigned long long func, launch, func_hash = 0;
  PyObject *stream_of;
  if (!PyArg_ParseTuple(args, "KKO|K", &func, &launch, &stream_of, &func_hash)) return nullptr;
  s->gfunc_hash = reinterpret_cast<void *>(uintptr_t(func_hash));
  Py_INCREF(stream_of);
  Py_XSETREF(s->stream_of, stream_of);
  s->gfunc = reinterpret_cast<void *>(uintptr_t(func));
  s->glaunch = reinterpret_cast<void *>(uintptr_t(launch));
  const char *per_seg = getenv("EPREPLAY_CAPTURE_GATHER_PER_SEG");
  s->gshared = per_seg && !strcmp(per_seg, "0");
  s->shandles->clear();
  if (s->side) s->shandles->emplace_back(s->side->id(), s->side_h);  // not the current stream's answer
  Py_RETURN_NONE;
}

// gather_info(): (raw gather launches, at::cat_out launches, raw path on, ns spent launching).
PyObject *sess_gather_info(PyObject *self, PyObject *) {
  Session *s = reinterpret_cast<Session *>(self);
  return Py_BuildValue("(LLOL)", (long long)s->glaunches[0], (long long)s->glaunches[1],
                       s->gfunc ? Py_True : Py_False, (long long)s->glaunches[2]);
}

// take_streams(): [(stream id, device index, device type, cudaStream_t or 0)] gathered on since
// the last call.
PyObject *sess_take_streams(PyObject *self, PyObject *) {
  Session *s = reinterpret_cast<Session *>(self);
  PyObject *out = PyList_New(0);
  for (const auto &st : *s->streams) {
    void *h = nullptr;  // the raw cudaStream_t where the raw launch asked for it (else 0)
    for (const auto &kv : *s->shandles)
      if (kv.first == st.id()) h = kv.second;
    PyObject *item = Py_BuildValue("(LiiK)", (long long)st.id(), int(st.device_index()), int(st.device_type()),
                                   (unsigned long long)reinterpret_cast<uintptr_t>(h));
    if (!item || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  s->streams->clear();
  return out;
}

PyObject *sess_disable(PyObject *self, PyObject *) {
  reinterpret_cast<Session *>(self)->enabled = false;
  Py_RETURN_NONE;
}

PyObject *sess_plans(PyObject *self, PyObject *) {
  Session *s = reinterpret_cast<Session *>(self);
  Py_ssize_t live = 0;
  for (auto &kv : *s->plans) live += kv.second != nullptr;
  return Py_BuildValue("(nn)", Py_ssize_t(s->plans->size()), live);
}

// knows(key): whether `key` (pending()'s bytes) has its plan, or its "never", already: a recv
// hook's call learned after another call of its site (two micro-batches' first dispatches both
// pending) must not add a second copy of the plan to the ring's plan area.
PyObject *sess_knows(PyObject *self, PyObject *args) {
  PyObject *key_bytes;
  if (!PyArg_ParseTuple(args, "S", &key_bytes)) return nullptr;
  Key key;
  key_from_bytes(key_bytes, &key);
  return PyBool_FromLong(reinterpret_cast<Session *>(self)->plans->count(key) != 0);
}

PyMethodDef sess_methods[] = {
    {"knows", sess_knows, METH_VARARGS, "knows(key): whether the key has its plan (or its never) already."},
    {"learn", sess_learn, METH_VARARGS, "learn(spec[, key]): a plan for the pending call's key (see _hookx.cpp)."},
    {"hung", sess_hung, METH_VARARGS, "hung(now_ns, timeout_ns): fast calls running past the timeout."},
    {"lineage_put", sess_lineage_put, METH_VARARGS, "lineage_put(tensor, seq): this handle came from dispatch seq."},
    {"lineage_get", sess_lineage_get, METH_O, "lineage_get(tensor): the dispatch seq of a handle, or -1."},
    {"disable", sess_disable, METH_NOARGS, "Calls go through the Python hook from now on."},
    {"set_device", sess_set_device, METH_VARARGS, "set_device(D, dstate, capturing): the device ring."},
    {"take_streams", sess_take_streams, METH_NOARGS, "Streams gathered on since the last call."},
    {"set_gather", sess_set_gather, METH_VARARGS,
     "set_gather(func, launch, stream_of[, func_hash]): the raw gather launches."},
    {"gather_info", sess_gather_info, METH_NOARGS, "(raw gather launches, at::cat_out launches, raw path on, ns launching)."},
    {"plans", sess_plans, METH_NOARGS, "(keys seen, plans learned)."},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject SessionType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- module ------------------------------------------------------------------------------------
PyObject *mod_activate(PyObject *, PyObject *sess) {
  if (sess != Py_None && !PyObject_TypeCheck(sess, &SessionType)) {
    PyErr_SetString(PyExc_TypeError, "activate(Session | None)");
    return nullptr;
  }
  Session *old = g_sess;
  g_plans_changed++;
  if (sess == Py_None) {
    g_sess = nullptr;
  } else {
    Py_INCREF(sess);
    g_sess = reinterpret_cast<Session *>(sess);
  }
  Py_XDECREF(old);
  Py_RETURN_NONE;
}

PyObject *mod_after_fork(PyObject *, PyObject *) {
  g_sess = nullptr;  // the parent's session (its ring, its writer) is not this process's
  g_plans_changed++;
  t_depth = 0;
  t_pending = Pending();
  Py_RETURN_NONE;
}

// host_hash_fast(): whether the hook fingerprints host rows itself (AVX-512DQ and BW here: _hosthash.h).
PyObject *mod_host_hash_fast(PyObject *, PyObject *) { return PyBool_FromLong(hosthash::fast()); }

// host_hash_rows(x): (fp [T] int64, marks [T] int8) of a host tensor x [T, H] (whole 64-bit lanes
// a row) as the hook hashes rows at `fingerprints` (tests compare it with format/fingerprint.py);
// None where it would not hash them (no AVX-512, a layout it does not take).
PyObject *mod_host_hash_rows(PyObject *, PyObject *o) {
  if (!THPVariable_Check(o)) {
    PyErr_SetString(PyExc_TypeError, "host_hash_rows(x): a tensor");
    return nullptr;
  }
  const at::Tensor &x = THPVariable_Unpack(o);
  if (!x.defined() || !x.is_cpu()) Py_RETURN_NONE;
  ArraySpec a;
  a.dtype = x.scalar_type();
  a.ndim = 2;
  std::vector<int64_t> fp;
  std::vector<int8_t> marks;
  if (!host_hash(a, x, nullptr, 0, nullptr, fp, marks)) Py_RETURN_NONE;
  at::Tensor f = at::empty({int64_t(fp.size())}, at::kLong), m = at::empty({int64_t(marks.size())}, at::kChar);
  if (!fp.empty()) memcpy(f.data_ptr(), fp.data(), fp.size() * 8);
  if (!marks.empty()) memcpy(m.data_ptr(), marks.data(), marks.size());
  return Py_BuildValue("(NN)", THPVariable_Wrap(f), THPVariable_Wrap(m));
}

// profile(): {segment: ns summed, "calls": n} of this thread's hooked calls; None unless built
// with -DHOOKX_PROFILE.
PyObject *mod_profile(PyObject *, PyObject *) {
#ifdef HOOKX_PROFILE
  PyObject *d = PyDict_New();
  for (int i = 0; d && i < kProf; i++) {
    if (!*kProfNames[i]) continue;
    PyObject *v = PyLong_FromLongLong(t_prof[i]);
    PyDict_SetItemString(d, kProfNames[i], v);
    Py_XDECREF(v);
  }
  PyObject *n = PyLong_FromLongLong(t_prof[kProf]);
  if (d) PyDict_SetItemString(d, "calls", n);
  Py_XDECREF(n);
  return d;
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef mod_methods[] = {
    {"host_hash_fast", mod_host_hash_fast, METH_NOARGS, "Whether host rows are fingerprinted in the hook."},
    {"host_hash_rows", mod_host_hash_rows, METH_O, "host_hash_rows(x): (fp, marks) of x's rows as the hook hashes them."},
    {"profile", mod_profile, METH_NOARGS, "The hook's time by segment (a -DHOOKX_PROFILE build), else None."},
    {"activate", mod_activate, METH_O, "activate(session | None): the process's active session."},
    {"pending", sess_pending, METH_NOARGS, "(hook, nargs, kwnames, tagged key) of the call this thread's Python hook may learn a plan for."},
    {"after_fork", mod_after_fork, METH_NOARGS, "In a forked child: no session."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_hookx", "The compiled capture hook (see _hookx.cpp).", -1,
                          mod_methods};

}  // namespace

PyMODINIT_FUNC PyInit__hookx(void) {
  HookType.tp_name = "epreplay.capture._hookx.Hook";
  HookType.tp_basicsize = sizeof(Hook);
  HookType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR;
  HookType.tp_vectorcall_offset = offsetof(Hook, vectorcall);
  HookType.tp_call = PyVectorcall_Call;
  HookType.tp_new = hook_new;
  HookType.tp_dealloc = hook_dealloc;
  HookType.tp_descr_get = hook_get;
  HookType.tp_dictoffset = offsetof(Hook, dict);
  HookType.tp_getattro = PyObject_GenericGetAttr;
  HookType.tp_setattro = PyObject_GenericSetAttr;
  HookType.tp_getset = hook_getset;
  HookType.tp_doc = "Hook(orig, slow, op): a Buffer method that captures through a learned plan.";
  SessionType.tp_name = "epreplay.capture._hookx.Session";
  SessionType.tp_basicsize = sizeof(Session);
  SessionType.tp_flags = Py_TPFLAGS_DEFAULT;
  SessionType.tp_new = sess_new;
  SessionType.tp_dealloc = sess_dealloc;
  SessionType.tp_methods = sess_methods;
  SessionType.tp_doc = "Session(rec, ring state, base, words, cap, attr, stats, layers_per_step, marks_local)";
  RecvHookType.tp_name = "epreplay.capture._hookx.RecvHook";
  RecvHookType.tp_basicsize = sizeof(RecvHook);
  RecvHookType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  RecvHookType.tp_vectorcall_offset = offsetof(RecvHook, vectorcall);
  RecvHookType.tp_call = PyVectorcall_Call;
  RecvHookType.tp_dealloc = recv_dealloc;
  RecvHookType.tp_doc = "A compiled low-latency call's recv hook: calls DeepEP's, then writes the call's outputs.";
  if (PyType_Ready(&HookType) < 0 || PyType_Ready(&SessionType) < 0 || PyType_Ready(&RecvHookType) < 0)
    return nullptr;
  s_dict = PyUnicode_InternFromString("__dict__");
  s_state = PyUnicode_InternFromString("state");
  s_step = PyUnicode_InternFromString("step");
  s_layer = PyUnicode_InternFromString("layer");
  s_pending_tags = PyUnicode_InternFromString("pending_tags");
  s_epreplay_capture = PyUnicode_InternFromString("_epreplay_capture");
  s_owner = PyUnicode_InternFromString("owner");
  s_cnt = PyUnicode_InternFromString("cnt");
  s_id = PyUnicode_InternFromString("id");
  s_fast_raised = PyUnicode_InternFromString("_fast_raised");
  s_fast_mismatch = PyUnicode_InternFromString("_fast_mismatch");
  s_fast_end = PyUnicode_InternFromString("_fast_end");
  s_current_stream_wait = PyUnicode_InternFromString("current_stream_wait");
  PyObject *m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  Py_INCREF(&HookType);
  Py_INCREF(&SessionType);
  PyModule_AddObject(m, "Hook", reinterpret_cast<PyObject *>(&HookType));
  PyModule_AddObject(m, "Session", reinterpret_cast<PyObject *>(&SessionType));
  PyModule_AddStringConstant(m, "torch_version", EPREPLAY_TORCH_VERSION);
  PyModule_AddIntConstant(m, "FAST", FAST_KIND);
  return m;
}
