/* The device ring's drain as a native thread: device_stage.py's batch with no Python at all.
 *
 * Why: the drain's driver calls already ran without the GIL (_ringc.drain), but its bookkeeping
 * around them was Python on a thread of the job's process: every 2 ms it took the GIL from the
 * job's thread for 46-80 us (an H200 host, bench/capture_hotpath.py "drain GIL us"), as much as
 * the hooked calls it drained cost themselves. Here a pthread does all of it: it never takes the
 * GIL, so the job's thread is never asked to drop it.
 *
 * A batch (every period):
 *   1. frames = the producer's written-frames head (ShmRing.state[4], advanced after a frame's
 *      bytes are in the ring), read first: every frame below it has its D bytes below the head
 *      read next
 *   2. head, streams = D's head and the streams gathered on since the last batch, in one
 *      critical section with the producers (_drain.h)
 *   3. under the quiet lock (graph_ring.QUIET: never a CUDA call while the job captures a
 *      graph): an event on each stream, the side stream waits on it, D's new bytes are copied
 *      into the ring's registered mirror area (one copy, two where they wrap), then the wait for
 *      the copy (a blocking-sync event: the thread sleeps)
 *   4. the ring's head word = frames: the writer process sees the frames and their bytes
 * A failing driver call ends the thread with its CUresult (Drainer.rc): device_stage turns
 * capture off with one log line; the job is never touched.
 *
 * Lock: a binary semaphore with threading.Lock's interface, so the quiet lock is one that both
 * Python threads (the graph capture's wrapper, the other drains) and this thread take.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <semaphore.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "_drain.h"

#define W_HEAD 8

/* --- Lock -------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    sem_t sem;
} LockObject;

static void sem_take(sem_t *s) {
    while (sem_wait(s) != 0 && errno == EINTR) {
    }
}

static int lock_init(LockObject *self, PyObject *args, PyObject *kw) {
    if (sem_init(&self->sem, 0, 1) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void lock_dealloc(LockObject *self) {
    sem_destroy(&self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* acquire(blocking=True, timeout=-1): threading.Lock.acquire; waits without the GIL. */
static PyObject *lock_acquire(LockObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pd", names, &blocking, &timeout)) return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (sem_trywait(&self->sem) == 0) Py_RETURN_TRUE;
    if (!blocking || timeout == 0) Py_RETURN_FALSE;
    int got;
    Py_BEGIN_ALLOW_THREADS
    if (timeout < 0) {
        sem_take(&self->sem);
        got = 1;
    } else {
        struct timespec at;
        clock_gettime(CLOCK_REALTIME, &at);
        double end = (double)at.tv_sec + at.tv_nsec / 1e9 + timeout;
        at.tv_sec = (time_t)end;
        at.tv_nsec = (long)((end - (double)at.tv_sec) * 1e9);
        int rc;
        while ((rc = sem_timedwait(&self->sem, &at)) != 0 && errno == EINTR) {
        }
        got = rc == 0;
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(got);
}

static PyObject *lock_release(LockObject *self, PyObject *unused) {
    int v = 0;
    sem_getvalue(&self->sem, &v);
    if (v > 0) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    sem_post(&self->sem);
    Py_RETURN_NONE;
}

static PyObject *lock_locked(LockObject *self, PyObject *unused) {
    int v = 0;
    sem_getvalue(&self->sem, &v);
    return PyBool_FromLong(v <= 0);
}

static PyObject *lock_exit(LockObject *self, PyObject *args) { return lock_release(self, NULL); }

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool (waits without the GIL)"},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)(void (*)(void))lock_acquire, METH_VARARGS | METH_KEYWORDS, NULL},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "epreplay.capture._drainc.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A lock with threading.Lock's interface that C threads take too (module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lock_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = lock_methods,
};

/* --- Drainer ----------------------------------------------------------------------------- */
typedef int (*ev_record_fn)(uintptr_t, uintptr_t);
typedef int (*wait_event_fn)(uintptr_t, uintptr_t, unsigned);
typedef int (*dtoh_fn)(void *, uint64_t, size_t, uintptr_t);
typedef int (*ev_sync_fn)(uintptr_t);
typedef int (*ctx_set_fn)(uintptr_t);

typedef struct {
    PyObject_HEAD
    /* configuration, fixed at construction */
    uintptr_t fn[5]; /* cuEventRecord, cuStreamWaitEvent, cuMemcpyDtoHAsync_v2, cuEventSynchronize, cuCtxSetCurrent */
    uintptr_t ctx, side, done, ev;
    uint64_t dptr;
    int64_t cap, period_ns;
    char *mirror;                /* the ring's device mirror area (in mm) */
    volatile uint64_t *words;    /* the ring's header words (mm) */
    uint64_t *state;             /* ShmRing.state: [4] frames written */
    PyObject *quiet;             /* a Lock */
    Py_buffer mm_v, state_v, dstate_v;
    int have_bufs;
    epr_streams tbl;             /* tbl.head: DeviceStage.dstate[0] */
    /* the thread */
    pthread_t th;
    pthread_mutex_t wmu;
    pthread_cond_t wcv;
    int started, stopping, finished;
    pid_t pid;                   /* the process whose thread it is: a forked child has none */
    /* results (written by the thread; read under wmu or after the join) */
    int64_t drained, published, batches, cpu_ns;
    int rc;
} Drainer;

/* One batch (module docstring); 0 or the failing CUresult. Never touches Python. */
static int drain_batch(Drainer *d) {
    uint64_t frames = __atomic_load_n(&d->state[4], __ATOMIC_ACQUIRE);
    uintptr_t st[EPR_MAX_STREAMS];
    pthread_mutex_lock(&d->tbl.mu);
    int64_t head = __atomic_load_n(d->tbl.head, __ATOMIC_ACQUIRE);
    int ns = d->tbl.n;
    for (int i = 0; i < ns; i++) st[i] = d->tbl.h[i];
    d->tbl.n = 0;
    pthread_mutex_unlock(&d->tbl.mu);
    int rc = 0;
    if (head > d->drained) {
        sem_take(&((LockObject *)d->quiet)->sem);
        for (int i = 0; !rc && i < ns; i++) {
            rc = ((ev_record_fn)d->fn[0])(d->ev, st[i]);
            if (!rc) rc = ((wait_event_fn)d->fn[1])(d->side, d->ev, 0);
        }
        for (int64_t a = d->drained; !rc && a < head;) { /* one copy, two where D wraps */
            int64_t off = a % d->cap, n = head - a < d->cap - off ? head - a : d->cap - off;
            rc = ((dtoh_fn)d->fn[2])(d->mirror + off, d->dptr + (uint64_t)off, (size_t)n, d->side);
            a += n;
        }
        if (!rc) rc = ((ev_record_fn)d->fn[0])(d->done, d->side);
        if (!rc) rc = ((ev_sync_fn)d->fn[3])(d->done);
        sem_post(&((LockObject *)d->quiet)->sem);
        if (rc) return rc;
        d->drained = head;
        d->batches++;
    }
    if (frames > (uint64_t)d->published) { /* the frames, now that their bytes are in the ring */
        __atomic_store_n(&d->words[W_HEAD], frames, __ATOMIC_RELEASE);
        d->published = (int64_t)frames;
    }
    return 0;
}

static int64_t thread_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *drain_run(void *arg) {
    Drainer *d = (Drainer *)arg;
    int64_t t0 = thread_ns();
    int rc = d->ctx ? ((ctx_set_fn)d->fn[4])(d->ctx) : 0; /* the driver calls need D's context */
    pthread_mutex_lock(&d->wmu);
    while (!rc) {
        int last = d->stopping;
        if (!last) {
            struct timespec at;
            clock_gettime(CLOCK_MONOTONIC, &at);
            int64_t ns = at.tv_nsec + d->period_ns;
            at.tv_sec += ns / 1000000000;
            at.tv_nsec = ns % 1000000000;
            pthread_cond_timedwait(&d->wcv, &d->wmu, &at);
            last = d->stopping;
        }
        pthread_mutex_unlock(&d->wmu);
        rc = drain_batch(d); /* when stopping: the final batch, then out */
        pthread_mutex_lock(&d->wmu);
        d->cpu_ns = thread_ns() - t0;
        if (last) break;
    }
    d->rc = rc;
    d->finished = 1;
    d->cpu_ns = thread_ns() - t0;
    pthread_mutex_unlock(&d->wmu);
    return NULL;
}

/* Drainer(fns, ctx, side, done, ev, mm, mirror_off, d_ptr, cap, state, dstate, quiet, period_s)
 *   fns      addresses of (cuEventRecord, cuStreamWaitEvent, cuMemcpyDtoHAsync_v2,
 *            cuEventSynchronize, cuCtxSetCurrent); ctx: D's CUcontext (0: the thread sets none)
 *   side, done, ev   the drain's CUstream and CUevents (done: blocking-sync)
 *   mm       the ring's mapping (header words at 0, the mirror area at mirror_off)
 *   d_ptr, cap       D's device address and bytes
 *   state    ShmRing.state (array 'Q' of >= 5); dstate: DeviceStage.dstate (array 'q')
 *   quiet    a Lock (graph_ring.QUIET); period_s: seconds between batches
 * The thread starts at once; drained from dstate[0] (a reused ring's position). */
static int drainer_init(Drainer *d, PyObject *args, PyObject *kw) {
    unsigned long long f[5], ctx, side, done, ev, mirror_off, dptr;
    long long cap;
    double period;
    PyObject *mm, *state, *dstate, *quiet;
    if (d->started || d->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "Drainer: already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "(KKKKK)KKKKOKKLOOOd", &f[0], &f[1], &f[2], &f[3], &f[4], &ctx, &side,
                          &done, &ev, &mm, &mirror_off, &dptr, &cap, &state, &dstate, &quiet, &period))
        return -1;
    if (!PyObject_TypeCheck(quiet, &LockType)) {
        PyErr_SetString(PyExc_TypeError, "Drainer: quiet must be a _drainc.Lock");
        return -1;
    }
    if (cap <= 0 || period <= 0) {
        PyErr_SetString(PyExc_ValueError, "Drainer: cap and period must be positive");
        return -1;
    }
    if (PyObject_GetBuffer(mm, &d->mm_v, PyBUF_WRITABLE) < 0) return -1;
    if (PyObject_GetBuffer(state, &d->state_v, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&d->mm_v);
        return -1;
    }
    if (PyObject_GetBuffer(dstate, &d->dstate_v, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&d->mm_v);
        PyBuffer_Release(&d->state_v);
        return -1;
    }
    d->have_bufs = 1;
    if (d->state_v.len < 40 || d->dstate_v.len < 8 || (long long)mirror_off + cap > (long long)d->mm_v.len) {
        PyErr_SetString(PyExc_ValueError, "Drainer: state must hold 5 words, dstate 1, mm the mirror area");
        return -1;
    }
    for (int i = 0; i < 5; i++) d->fn[i] = (uintptr_t)f[i];
    d->ctx = (uintptr_t)ctx, d->side = (uintptr_t)side, d->done = (uintptr_t)done, d->ev = (uintptr_t)ev;
    d->dptr = dptr;
    d->cap = cap;
    d->period_ns = (int64_t)(period * 1e9);
    d->words = (volatile uint64_t *)d->mm_v.buf;
    d->mirror = (char *)d->mm_v.buf + mirror_off;
    d->state = (uint64_t *)d->state_v.buf;
    d->tbl.head = (int64_t *)d->dstate_v.buf;
    d->tbl.n = 0;
    d->drained = *d->tbl.head;
    d->published = (int64_t)d->words[W_HEAD];
    Py_INCREF(quiet);
    d->quiet = quiet;
    pthread_mutex_init(&d->tbl.mu, NULL);
    pthread_mutex_init(&d->wmu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->wcv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&d->th, NULL, drain_run, d) != 0) {
        PyErr_SetString(PyExc_OSError, "Drainer: could not start its thread");
        return -1;
    }
    d->started = 1;
    d->pid = getpid();
    return 0;
}

/* In a forked child the thread is not there (nor its driver state): nothing to stop or join. */
static int ours(Drainer *d) { return d->started && d->pid == getpid(); }

/* stop(): the final batch (everything gathered so far reaches the ring), then the thread ends;
 * waits without the GIL. Returns rc (0, or the CUresult that ended it). Idempotent. */
static PyObject *drainer_stop(Drainer *d, PyObject *unused) {
    if (ours(d)) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&d->wmu);
        d->stopping = 1;
        pthread_cond_signal(&d->wcv);
        pthread_mutex_unlock(&d->wmu);
        pthread_join(d->th, NULL);
        Py_END_ALLOW_THREADS
        d->started = 0;
    }
    return PyLong_FromLong(d->rc);
}

static void drainer_dealloc(Drainer *d) {
    if (ours(d)) {
        pthread_mutex_lock(&d->wmu);
        d->stopping = 1;
        pthread_cond_signal(&d->wcv);
        pthread_mutex_unlock(&d->wmu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(d->th, NULL);
        Py_END_ALLOW_THREADS
    }
    if (d->have_bufs) {
        PyBuffer_Release(&d->mm_v);
        PyBuffer_Release(&d->state_v);
        PyBuffer_Release(&d->dstate_v);
    }
    Py_XDECREF(d->quiet);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* advance(stream, head): the Python path's gather launched on stream (a cudaStream_t) up to head. */
static PyObject *drainer_advance(Drainer *d, PyObject *args) {
    unsigned long long h;
    long long head;
    if (!PyArg_ParseTuple(args, "KL", &h, &head)) return NULL;
    if (!d->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "Drainer: not initialised");
        return NULL;
    }
    epr_advance(&d->tbl, (uintptr_t)h, head);
    Py_RETURN_NONE;
}

/* room(stream): whether a call on this stream can be noted before the next batch. */
static PyObject *drainer_room(Drainer *d, PyObject *arg) {
    unsigned long long h = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(d->have_bufs && epr_room(&d->tbl, (uintptr_t)h));
}

/* info(): (batches, thread CPU ns, rc, alive) */
static PyObject *drainer_info(Drainer *d, PyObject *unused) {
    pthread_mutex_lock(&d->wmu);
    PyObject *out = Py_BuildValue("(LLiO)", (long long)d->batches, (long long)d->cpu_ns, d->rc,
                                  d->started && !d->finished ? Py_True : Py_False);
    pthread_mutex_unlock(&d->wmu);
    return out;
}

/* table(): the address of the streams table, for the compiled hook (_hookx.cpp set_device) */
static PyObject *drainer_table(Drainer *d, PyObject *unused) {
    return PyLong_FromVoidPtr(d->have_bufs ? (void *)&d->tbl : NULL);
}

static PyMethodDef drainer_methods[] = {
    {"stop", (PyCFunction)drainer_stop, METH_NOARGS, "stop() -> rc: the final batch, then the thread ends."},
    {"advance", (PyCFunction)drainer_advance, METH_VARARGS, "advance(stream, head): a gather launched up to head."},
    {"room", (PyCFunction)drainer_room, METH_O, "room(stream) -> bool: the stream can be noted."},
    {"info", (PyCFunction)drainer_info, METH_NOARGS, "info() -> (batches, thread CPU ns, rc, alive)."},
    {"table", (PyCFunction)drainer_table, METH_NOARGS, "table() -> address of the streams table (_drain.h)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "epreplay.capture._drainc.Drainer",
    .tp_basicsize = sizeof(Drainer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The device ring's drain thread (module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)drainer_init,
    .tp_dealloc = (destructor)drainer_dealloc,
    .tp_methods = drainer_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_drainc", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__drainc(void) {
    if (PyType_Ready(&LockType) < 0 || PyType_Ready(&DrainerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&LockType);
    Py_INCREF(&DrainerType);
    if (PyModule_AddObject(m, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObject(m, "Drainer", (PyObject *)&DrainerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
