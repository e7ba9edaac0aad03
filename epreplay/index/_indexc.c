/* The index's routing aggregation in C: epreplay.index.shard._chunk_numpy without the temporaries.
 *
 * Why: aggregating a shard's routing (per (step, layer) pair: slots per expert, rows and bytes
 * per destination rank, a normal dispatch counting a token once per destination) is most of
 * what indexing costs in numpy (~20 ns per (token, k) slot: int64 keys, masks, two bincounts
 * over [G, K] temporaries). Here it is one pass over the ids, ~1-2 ns per slot, with the GIL
 * released, so two index workers use two cores. Same results as the numpy path, count for
 * count (tests/test_index.py compares both on every id width); where this module was not built
 * (no compiler) index_build uses numpy.
 *
 * aggregate(idx, itemsize, K, p_G, rb_G, load, sent, bytes, E, R, X, dedup)
 *   idx     [G, K] expert ids, C-contiguous: itemsize 1 (uint8), 2 (int16) or 8 (int64); ids
 *           outside [0, E) (-1: no expert) are skipped
 *   p_G     [G] int32 row of each token in the output blocks; rb_G [G] int64 bytes of its row
 *   load    writable [n, E] int64 slots per expert; sent / bytes writable [n, R] int64
 *   X       local experts per rank (destination = id / X); dedup: a token counts once per
 *           destination (normal dispatch) rather than once per slot (low-latency)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

/* One pass over tokens g of ids of type T: the loop body is instantiated per id width so the
 * inner loop has no switch; dst_E maps an id to its destination rank (-1: beyond the ranks). */
#define AGGREGATE_LOOP(T)                                                                     \
    for (Py_ssize_t g = 0; g < G; g++) {                                                     \
        int64_t row = p_G[g];                                                                \
        if (row < 0 || row >= rows) {                                                        \
            bad = 1;                                                                         \
            break;                                                                           \
        }                                                                                    \
        uint32_t stamp = (uint32_t)(g + 1);                                                  \
        int64_t *Lr = L + row * E, *Sr = S + row * R, *Br = B + row * R, rb = rb_G[g];       \
        const T *ids = (const T *)idx.buf + g * K;                                           \
        for (int k = 0; k < K; k++) {                                                        \
            int64_t e = (int64_t)ids[k];                                                     \
            if (e < 0 || e >= E)                                                             \
                continue;                                                                    \
            Lr[e] += 1;                                                                      \
            int32_t d = dst_E[e];                                                            \
            if (d < 0)                                                                       \
                continue;                                                                    \
            /* branchless: whether a destination repeats within a token is data (~1 in 5 \
             * slots for top-8 over 64 ranks), a branch on it mispredicts */                 \
            int64_t fresh = !dedup | (seen[d] != stamp);                                     \
            seen[d] = stamp;                                                                 \
            Sr[d] += fresh;                                                                  \
            Br[d] += rb & -fresh;                                                            \
        }                                                                                    \
    }

static PyObject *aggregate(PyObject *self, PyObject *args) {
    Py_buffer idx, p, rb, load, sent, bytes;
    int itemsize, K, E, R, X, dedup;
    if (!PyArg_ParseTuple(args, "y*iiy*y*w*w*w*iiii", &idx, &itemsize, &K, &p, &rb, &load, &sent,
                          &bytes, &E, &R, &X, &dedup))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t G = p.len / 4;
    Py_ssize_t n_load = load.len / 8, n_sent = sent.len / 8;
    if ((itemsize != 1 && itemsize != 2 && itemsize != 8) || K <= 0 || E <= 0 || R <= 0 || X <= 0
        || idx.len != G * K * itemsize || rb.len != G * 8 || bytes.len != sent.len
        || n_load % E || n_sent % R) {
        PyErr_SetString(PyExc_ValueError, "aggregate: inconsistent shapes");
        goto done;
    }
    uint32_t *seen = calloc((size_t)R, sizeof(uint32_t));  /* token stamp per destination */
    int32_t *dst_E = malloc((size_t)E * sizeof(int32_t));
    if (!seen || !dst_E) {
        free(seen);
        free(dst_E);
        PyErr_NoMemory();
        goto done;
    }
    for (int e = 0; e < E; e++)
        dst_E[e] = e / X < R ? e / X : -1;
    const int32_t *p_G = p.buf;
    const int64_t *rb_G = rb.buf;
    int64_t *L = load.buf, *S = sent.buf, *B = bytes.buf;
    Py_ssize_t rows = n_load / E < n_sent / R ? n_load / E : n_sent / R;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 1) {
        AGGREGATE_LOOP(uint8_t)
    } else if (itemsize == 2) {
        AGGREGATE_LOOP(int16_t)
    } else {
        AGGREGATE_LOOP(int64_t)
    }
    Py_END_ALLOW_THREADS
    free(dst_E);
    free(seen);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "aggregate: a token's output row is out of range");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&idx);
    PyBuffer_Release(&p);
    PyBuffer_Release(&rb);
    PyBuffer_Release(&load);
    PyBuffer_Release(&sent);
    PyBuffer_Release(&bytes);
    return result;
}

static PyMethodDef methods[] = {
    {"aggregate", aggregate, METH_VARARGS, "Aggregate routing ids into load / sent / bytes blocks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_indexc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__indexc(void) { return PyModule_Create(&module); }
