/* Version-2 row fingerprints on the CPU in one pass (epreplay/format/fingerprint.py has the definition).
 *
 * Why: the capture writer hashes every CPU row it records at the `fingerprints` level. The torch
 * reference makes a dozen passes over int64 temporaries per chunk and costs ~1 ms per decode-sized
 * record on one core; on a host whose cores the job uses too, that time is taken from the job.
 * Here each 64-bit lane is loaded, mixed and summed once (~1 ns a lane), with the GIL released.
 * fingerprint_cpu.py wraps it; tests/test_fingerprint_cpu.py checks it against the reference
 * bit for bit (every word width, odd widths, FP8 pairs, non-finite rows).
 *
 * rows(parts, T) -> (fp bytes [T] uint64, finite bytes [T] uint8)
 *   parts  [(buffer of T rows of H words, contiguous, H, word bytes, float kind)], the parts of a
 *          row in order (x, then an FP8 pair's scales); float kind 0 none, 1 bf16, 2 f16, 3 f32:
 *          whose values the "all finite" flag checks (stage._row_finite's dtypes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SEED 0x9E3779B97F4A7C15ULL
#define SEED2 0xD1B54A32D192ED03ULL
#define M1 0xBF58476D1CE4E5B9ULL
#define M2 0x94D049BB133111EBULL
#define PMUL 0xC2B2AE3D27D4EB4FULL
#define MAX_PARTS 4

static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * M1;
    z = (z ^ (z >> 27)) * M2;
    return z ^ (z >> 31);
}

typedef struct {
    const unsigned char *data;
    Py_ssize_t H, wb, kind;
} Part;

/* Per float kind, the exponent bits of each word of a lane (a word is NaN/inf when all are set),
 * and the low bit and top bit of each word field (for the "some field is zero" test below). */
static const uint64_t EXP[4] = {0, 0x7F807F807F807F80ULL, 0x7C007C007C007C00ULL, 0x7F8000007F800000ULL};
static const uint64_t LOW[4] = {0, 0x0001000100010001ULL, 0x0001000100010001ULL, 0x0000000100000001ULL};
static const uint64_t TOP[4] = {0, 0x8000800080008000ULL, 0x8000800080008000ULL, 0x8000000080000000ULL};

/* Nonzero when some word of the lane has every exponent bit set: (lane & EXP) ^ EXP has a zero
 * field there, found with the classic has-zero test (exact for "some field is zero"). A padded
 * word is 0, never flagged. */
static inline uint64_t nonfinite(uint64_t lane, int kind) {
    uint64_t v = (lane & EXP[kind]) ^ EXP[kind];
    return (v - LOW[kind]) & ~v & TOP[kind];
}

static void hash_rows(const Part *parts, int np, Py_ssize_t T, uint64_t *fp, unsigned char *finite) {
    uint64_t n = 0;
    for (int p = 0; p < np; p++) n += (uint64_t)parts[p].H;
    for (Py_ssize_t t = 0; t < T; t++) {
        uint64_t acc = 0, k = 0, bad = 0;
        for (int p = 0; p < np; p++) {
            Py_ssize_t bytes = parts[p].H * parts[p].wb, full = bytes / 8, b;
            const unsigned char *row = parts[p].data + (size_t)t * (size_t)bytes;
            int kind = (int)parts[p].kind;
            uint64_t pos = k * PMUL;  /* lane k's position constant is (k * PMUL) ^ SEED */
            for (b = 0; b < full; b++, pos += PMUL) {
                uint64_t lane;
                memcpy(&lane, row + 8 * b, 8);  /* little-endian words, as a byte view gives */
                acc += mix(lane ^ pos ^ SEED);
                bad |= nonfinite(lane, kind);
            }
            k += (uint64_t)full;
            if (bytes % 8) {  /* the last lane, zero-padded */
                uint64_t lane = 0;
                memcpy(&lane, row + 8 * full, (size_t)(bytes % 8));
                acc += mix(lane ^ (k * PMUL) ^ SEED);
                bad |= nonfinite(lane, kind);
                k += 1;
            }
        }
        fp[t] = mix(acc ^ n ^ SEED2);
        finite[t] = (unsigned char)(bad == 0);
    }
}

static PyObject *fpc_rows(PyObject *self, PyObject *args) {
    PyObject *seq, *fp = NULL, *finite = NULL;
    Py_ssize_t T;
    Py_buffer views[MAX_PARTS];
    Part parts[MAX_PARTS];
    int np = 0, i;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &seq, &T)) return NULL;
    if (PyList_GET_SIZE(seq) < 1 || PyList_GET_SIZE(seq) > MAX_PARTS || T < 0) {
        PyErr_SetString(PyExc_ValueError, "rows: 1 to 4 parts and T >= 0");
        return NULL;
    }
    for (i = 0; i < PyList_GET_SIZE(seq); i++) {
        PyObject *buf;
        Py_ssize_t H, wb, kind;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(seq, i), "Onnn", &buf, &H, &wb, &kind)) goto done;
        if (PyObject_GetBuffer(buf, &views[np], PyBUF_C_CONTIGUOUS) < 0) goto done;
        np++;
        if ((wb != 1 && wb != 2 && wb != 4) || H < 0 || kind < 0 || kind > 3 ||
            views[np - 1].len < T * H * wb || (kind && wb != (kind == 3 ? 4 : 2))) {
            PyErr_SetString(PyExc_ValueError, "rows: a part is (T x H words of 1/2/4 bytes, H, word bytes, float kind)");
            goto done;
        }
        parts[np - 1].data = views[np - 1].buf;
        parts[np - 1].H = H;
        parts[np - 1].wb = wb;
        parts[np - 1].kind = kind;
    }
    fp = PyBytes_FromStringAndSize(NULL, T * 8);
    finite = PyBytes_FromStringAndSize(NULL, T);
    if (fp && finite) {
        uint64_t *f = (uint64_t *)PyBytes_AS_STRING(fp);
        unsigned char *ok = (unsigned char *)PyBytes_AS_STRING(finite);
        Py_BEGIN_ALLOW_THREADS
        hash_rows(parts, np, T, f, ok);
        Py_END_ALLOW_THREADS
    }
done:
    for (i = 0; i < np; i++) PyBuffer_Release(&views[i]);
    if (PyErr_Occurred() || !fp || !finite) {
        Py_XDECREF(fp);
        Py_XDECREF(finite);
        return NULL;
    }
    return Py_BuildValue("(NN)", fp, finite);
}

static PyMethodDef methods[] = {
    {"rows", fpc_rows, METH_VARARGS, "rows(parts, T): version-2 fingerprints and finite flags (see _fpc.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fpc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fpc(void) { return PyModule_Create(&module); }
