/* The capture ring's frame write in C: ring_frames.write_call without the interpreter.
 *
 * Why: writing one call's frame is the largest part of a hooked call's cost in Python (~24 us
 * per call right after the job's kernels: a spec tuple per array, a marshal, a ctypes memmove
 * per array, the ring's words). Here it is one C call that reads each tensor's facts through
 * the tensor's own Python attributes (no torch headers, so this builds with any C compiler and
 * Python's headers), marshals the descriptor, reserves, copies and publishes. The frame layout is
 * ring_frames.py's, byte for byte (tests/test_capture_ring.py writes both and compares);
 * everything this does not handle returns None and the Python path writes the frame.
 *
 * write(state, base, words, cap, kind, call_id, head, arrays, values, dev_specs, dtypes)
 *   state     writable buffer of 3-5 uint64: producer head, tail as last seen, deferred (0/1),
 *             busy, frames written (deferred rings: shm_ring.ShmRing.state)
 *   base      address of the ring's data area; words: address of its header words
 *   arrays    [(name, host tensor, tag)]; values [(name, value)]; dev_specs list or None
 *   dtypes    {torch dtype: (numpy dtype str, logical name or None)}
 *   returns   True (written), False (did not fit: dropped), None (not handled here)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stdint.h>
#include <string.h>

#define W_HEAD 8
#define W_TAIL 16
#define W_DROPPED 32
#define FRAME_SIZE 8   /* u32 length, u16 kind, u16 spare */
#define BODY 24        /* FRAME_SIZE + u32 desc_len, u16 codec, u16 spare, u64 call id */
#define PAD_KIND 0
#define ALIGN8(n) (((n) + 7) & ~((uint64_t)7))

static PyObject *s_is_contiguous, *s_contiguous, *s_dtype, *s_nbytes, *s_shape, *s_data_ptr;

static int reserve(uint64_t *state, volatile uint64_t *words, char *base, uint64_t cap,
                   uint64_t n, uint64_t *out_off) {
    uint64_t head = state[0];
    uint64_t off = head % cap;
    uint64_t pad = (off + n > cap) ? cap - off : 0;
    if (head + pad + n - state[1] > cap) {
        state[1] = words[W_TAIL];
        if (head + pad + n - state[1] > cap) {
            words[W_DROPPED] += 1;
            return 0;
        }
    }
    if (pad) {
        uint32_t len = (uint32_t)pad;
        uint16_t kind = PAD_KIND, spare = 0;
        memcpy(base + off, &len, 4);
        memcpy(base + off + 4, &kind, 2);
        memcpy(base + off + 6, &spare, 2);
        off = 0;
    }
    state[0] = head + pad + n;
    *out_off = off;
    return 1;
}

static PyObject *ring_write(PyObject *self, PyObject *args) {
    PyObject *state_obj, *head, *arrays, *values, *dev_specs, *dtypes;
    unsigned long long base_addr, words_addr, cap, call_id;
    int kind;
    if (!PyArg_ParseTuple(args, "OKKKiKOO!O!OO!", &state_obj, &base_addr, &words_addr, &cap, &kind,
                          &call_id, &head, &PyList_Type, &arrays, &PyList_Type, &values, &dev_specs,
                          &PyDict_Type, &dtypes))
        return NULL;
    Py_buffer sb;
    if (PyObject_GetBuffer(state_obj, &sb, PyBUF_WRITABLE) < 0)
        return NULL;
    if (sb.len < 24) {
        PyBuffer_Release(&sb);
        PyErr_SetString(PyExc_ValueError, "state must hold 3 uint64");
        return NULL;
    }
    uint64_t *state = (uint64_t *)sb.buf;
    Py_ssize_t n_arr = PyList_GET_SIZE(arrays);
    PyObject *specs = NULL, *keep = NULL, *desc = NULL, *raw = NULL, *result = NULL;
    uint64_t *ptrs = NULL, *sizes = NULL;
    specs = (dev_specs != Py_None && PyList_Check(dev_specs)) ? PyList_GetSlice(dev_specs, 0, PY_SSIZE_T_MAX)
                                                              : PyList_New(0);
    keep = PyList_New(0); /* contiguous copies made here live until the bytes are copied */
    ptrs = PyMem_Malloc(sizeof(uint64_t) * (n_arr + 1));
    sizes = PyMem_Malloc(sizeof(uint64_t) * (n_arr + 1));
    if (!specs || !keep || !ptrs || !sizes)
        goto done;
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n_arr; i++) {
        PyObject *item = PyList_GET_ITEM(arrays, i); /* (name, tensor, tag) */
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3)
            goto fallback;
        PyObject *name = PyTuple_GET_ITEM(item, 0), *t = PyTuple_GET_ITEM(item, 1),
                 *tag = PyTuple_GET_ITEM(item, 2);
        PyObject *contig = PyObject_CallMethodNoArgs(t, s_is_contiguous);
        if (!contig)
            goto done;
        int is_c = PyObject_IsTrue(contig);
        Py_DECREF(contig);
        if (!is_c) {
            PyObject *c = PyObject_CallMethodNoArgs(t, s_contiguous);
            if (!c || PyList_Append(keep, c) < 0) {
                Py_XDECREF(c);
                goto done;
            }
            Py_DECREF(c);
            t = c; /* kept alive by `keep` */
        }
        PyObject *dt = PyObject_GetAttr(t, s_dtype);
        if (!dt)
            goto done;
        PyObject *words = PyDict_GetItemWithError(dtypes, dt); /* borrowed */
        Py_DECREF(dt);
        if (!words) {
            if (PyErr_Occurred())
                goto done;
            goto fallback; /* a dtype seen for the first time: Python learns it */
        }
        PyObject *nbo = PyObject_GetAttr(t, s_nbytes);
        if (!nbo)
            goto done;
        unsigned long long nb = PyLong_AsUnsignedLongLong(nbo);
        Py_DECREF(nbo);
        if (PyErr_Occurred())
            goto done;
        PyObject *shp = PyObject_GetAttr(t, s_shape);
        if (!shp)
            goto done;
        PyObject *shape = PySequence_Tuple(shp);
        Py_DECREF(shp);
        if (!shape)
            goto done;
        PyObject *ptro = PyObject_CallMethodNoArgs(t, s_data_ptr);
        if (!ptro) {
            Py_DECREF(shape);
            goto done;
        }
        ptrs[i] = PyLong_AsUnsignedLongLong(ptro);
        Py_DECREF(ptro);
        sizes[i] = nb;
        PyObject *spec = Py_BuildValue("(OOOOOKi)", name, tag, PyTuple_GET_ITEM(words, 0), shape,
                                       PyTuple_GET_ITEM(words, 1), nb, -1);
        Py_DECREF(shape);
        if (!spec || PyList_Append(specs, spec) < 0) {
            Py_XDECREF(spec);
            goto done;
        }
        Py_DECREF(spec);
        total += ALIGN8(nb);
    }
    desc = PyTuple_Pack(3, head, specs, values);
    if (!desc)
        goto done;
    raw = PyMarshal_WriteObjectToString(desc, Py_MARSHAL_VERSION);
    if (!raw) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear();
            goto fallback; /* something marshal cannot carry: Python pickles it */
        }
        goto done;
    }
    {
        char *rb = PyBytes_AS_STRING(raw);
        uint64_t dl = (uint64_t)PyBytes_GET_SIZE(raw);
        uint64_t size = BODY + ALIGN8(dl) + total;
        volatile uint64_t *words = (volatile uint64_t *)(uintptr_t)words_addr;
        char *base = (char *)(uintptr_t)base_addr;
        uint64_t off;
        if (size > cap || !reserve(state, words, base, cap, size, &off)) {
            if (size > cap)
                words[W_DROPPED] += 1;
            result = Py_False;
            Py_INCREF(result);
            goto done;
        }
        char *at = base + off;
        uint32_t len32 = (uint32_t)size, dl32 = (uint32_t)dl;
        uint16_t kind16 = (uint16_t)kind, zero16 = 0;
        uint64_t id64 = call_id;
        memcpy(at, &len32, 4);
        memcpy(at + 4, &kind16, 2);
        memcpy(at + 6, &zero16, 2);
        memcpy(at + 8, &dl32, 4);
        memcpy(at + 12, &zero16, 2); /* codec 0: marshal */
        memcpy(at + 14, &zero16, 2);
        memcpy(at + 16, &id64, 8);
        memcpy(at + BODY, rb, dl);
        char *dst = at + BODY + ALIGN8(dl);
        for (Py_ssize_t i = 0; i < n_arr; i++) {
            if (sizes[i])
                memcpy(dst, (const void *)(uintptr_t)ptrs[i], sizes[i]);
            dst += ALIGN8(sizes[i]);
        }
        if (!state[2]) /* not deferred: publish (x86-64 keeps this store behind the data) */
            words[W_HEAD] = state[0];
        else if (sb.len >= 40) /* deferred: written, for the native drain (_drainc.c) to publish */
            __atomic_store_n(&state[4], state[0], __ATOMIC_RELEASE);
        result = Py_True;
        Py_INCREF(result);
        goto done;
    }
fallback:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(specs);
    Py_XDECREF(keep);
    Py_XDECREF(desc);
    Py_XDECREF(raw);
    PyMem_Free(ptrs);
    PyMem_Free(sizes);
    PyBuffer_Release(&sb);
    return result;
}

/* ring_path._key in C: the part of a call-site key one argument contributes. */
static PyObject *s_is_cuda, *s_list;

static PyObject *arg_key(PyObject *v, PyObject *tensor_type) {
    if (v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
        PyUnicode_CheckExact(v)) {
        Py_INCREF(v);
        return v;
    }
    if (PyTuple_CheckExact(v)) {
        Py_ssize_t n = PyTuple_GET_SIZE(v);
        PyObject *out = PyTuple_New(n);
        if (!out)
            return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *k = arg_key(PyTuple_GET_ITEM(v, i), tensor_type);
            if (!k) {
                Py_DECREF(out);
                return NULL;
            }
            PyTuple_SET_ITEM(out, i, k);
        }
        return out;
    }
    int is_t = PyObject_IsInstance(v, tensor_type);
    if (is_t < 0)
        return NULL;
    if (is_t) {
        PyObject *dt = PyObject_GetAttr(v, s_dtype), *shape = PyObject_GetAttr(v, s_shape),
                 *cuda = PyObject_GetAttr(v, s_is_cuda);
        PyObject *out = (dt && shape && cuda) ? PyTuple_Pack(3, dt, shape, cuda) : NULL;
        Py_XDECREF(dt);
        Py_XDECREF(shape);
        Py_XDECREF(cuda);
        return out;
    }
    if (PyList_CheckExact(v))
        return Py_BuildValue("(On)", s_list, PyList_GET_SIZE(v));
    PyObject *cls = (PyObject *)Py_TYPE(v);
    if (strcmp(Py_TYPE(v)->tp_name, "Config") == 0 ||
        (strrchr(Py_TYPE(v)->tp_name, '.') && strcmp(strrchr(Py_TYPE(v)->tp_name, '.') + 1, "Config") == 0))
        return Py_BuildValue("(ON)", cls, PyLong_FromVoidPtr(v));
    Py_INCREF(cls);
    return cls;
}

static PyObject *ring_key(PyObject *self, PyObject *args) {
    PyObject *values, *tensor_type;
    if (!PyArg_ParseTuple(args, "OO", &values, &tensor_type))
        return NULL;
    PyObject *seq = PySequence_Fast(values, "values must be iterable");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyTuple_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *k = arg_key(PySequence_Fast_GET_ITEM(seq, i), tensor_type);
        if (!k) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, k);
    }
    Py_DECREF(seq);
    return out;
}

/* drain(fns, side, done, ev, streams, copies): device_stage's batch drain without the GIL.
 *   fns      (cuEventRecord, cuStreamWaitEvent, cuMemcpyDtoHAsync_v2, cuEventSynchronize) addresses
 *   side     the drain's CUstream; done, ev: CUevents (ev is recorded on each of `streams`, the
 *            streams the calls gathered on, and waited for by side; done after the copies)
 *   copies   ((host dst, device src, bytes), ...) into the ring's registered mirror area
 *   returns  0, or the first failing CUresult
 * Why in C: in Python the same dozen torch calls held the job's GIL ~100+ us a batch and the
 * job's launches waited on it; here the GIL is released for all of it, including the wait. */
typedef int (*ev_record_fn)(uintptr_t, uintptr_t);
typedef int (*wait_event_fn)(uintptr_t, uintptr_t, unsigned);
typedef int (*dtoh_fn)(void *, uint64_t, size_t, uintptr_t);
typedef int (*ev_sync_fn)(uintptr_t);
#define DRAIN_MAX 16

static PyObject *ring_drain(PyObject *self, PyObject *args) {
    unsigned long long f[4], side, done, ev;
    PyObject *streams, *copies;
    if (!PyArg_ParseTuple(args, "(KKKK)KKKO!O!", &f[0], &f[1], &f[2], &f[3], &side, &done, &ev,
                          &PyTuple_Type, &streams, &PyTuple_Type, &copies))
        return NULL;
    Py_ssize_t ns = PyTuple_GET_SIZE(streams), nc = PyTuple_GET_SIZE(copies);
    if (ns > DRAIN_MAX || nc > 2) {
        PyErr_SetString(PyExc_ValueError, "drain: at most 16 streams and 2 copies");
        return NULL;
    }
    uintptr_t st[DRAIN_MAX];
    unsigned long long cp[2][3];
    for (Py_ssize_t i = 0; i < ns; i++) {
        st[i] = (uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(streams, i));
        if (PyErr_Occurred()) return NULL;
    }
    for (Py_ssize_t i = 0; i < nc; i++)
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(copies, i), "KKK", &cp[i][0], &cp[i][1], &cp[i][2])) return NULL;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; !rc && i < ns; i++) {
        rc = ((ev_record_fn)(uintptr_t)f[0])((uintptr_t)ev, st[i]);
        if (!rc) rc = ((wait_event_fn)(uintptr_t)f[1])((uintptr_t)side, (uintptr_t)ev, 0);
    }
    for (Py_ssize_t i = 0; !rc && i < nc; i++)
        rc = ((dtoh_fn)(uintptr_t)f[2])((void *)(uintptr_t)cp[i][0], cp[i][1], (size_t)cp[i][2], (uintptr_t)side);
    if (!rc) rc = ((ev_record_fn)(uintptr_t)f[0])((uintptr_t)done, (uintptr_t)side);
    if (!rc) rc = ((ev_sync_fn)(uintptr_t)f[3])((uintptr_t)done);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"write", ring_write, METH_VARARGS, "Write one call frame into the capture ring (see _ringc.c)."},
    {"drain", ring_drain, METH_VARARGS, "drain(fns, side, done, ev, streams, copies): a device batch, GIL released."},
    {"key", ring_key, METH_VARARGS, "key(values, Tensor): ring_path._key of each value, as a tuple."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ringc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ringc(void) {
    s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    s_contiguous = PyUnicode_InternFromString("contiguous");
    s_dtype = PyUnicode_InternFromString("dtype");
    s_nbytes = PyUnicode_InternFromString("nbytes");
    s_shape = PyUnicode_InternFromString("shape");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    s_is_cuda = PyUnicode_InternFromString("is_cuda");
    s_list = PyUnicode_InternFromString("list");
    return PyModule_Create(&module);
}
