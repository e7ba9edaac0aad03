/* What the compiled hook (_hookx.cpp) and the native device drain (_drainc.c) share: the table of
 * streams the calls gathered on since the drain's last batch, and the device ring's head.
 *
 * The drain copies D's bytes up to the head it read only after an event on every stream those
 * bytes were written on; so a producer notes its stream and advances the head in ONE critical
 * section (epr_advance), and the drain reads the head and takes the streams in one
 * (epr_take): every stream of bytes below the head it read is in the streams it took. Both are
 * a few stores under an uncontended mutex (~40 ns); the drain holds it for no driver call.
 */
#ifndef EPREPLAY_DRAIN_H
#define EPREPLAY_DRAIN_H

#include <pthread.h>
#include <stdint.h>

#define EPR_MAX_STREAMS 32

typedef struct {
    pthread_mutex_t mu;
    int n;                          /* streams noted since the last batch */
    uintptr_t h[EPR_MAX_STREAMS];   /* their cudaStream_t */
    int64_t *head;                  /* D's reserved bytes (absolute): DeviceStage.dstate[0] */
} epr_streams;

/* Whether a call gathering on stream h can note it (checked before the launch: only the drain
 * takes streams away, so the answer stays true until epr_advance). */
static inline int epr_room(epr_streams *t, uintptr_t h) {
    pthread_mutex_lock(&t->mu);
    int ok = t->n < EPR_MAX_STREAMS;
    for (int i = 0; !ok && i < t->n; i++) ok = t->h[i] == h;
    pthread_mutex_unlock(&t->mu);
    return ok;
}

/* A call's bytes [.., head) are launched on stream h: note h and publish the head together. */
static inline void epr_advance(epr_streams *t, uintptr_t h, int64_t head) {
    pthread_mutex_lock(&t->mu);
    int seen = 0;
    for (int i = 0; i < t->n; i++) seen |= t->h[i] == h;
    if (!seen && t->n < EPR_MAX_STREAMS) t->h[t->n++] = h;
    __atomic_store_n(t->head, head, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&t->mu);
}

#endif
