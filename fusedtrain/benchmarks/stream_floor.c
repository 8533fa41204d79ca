/* The memory floor of an fp32 Adam step on this CPU: the same bytes as the step (read p, g,
 * m, v; write p, m, v: 28 bytes per element with fp32 moments, 20 with bf16 ones, 16 with
 * 8-bit ones) with a few FMAs (on 2- and 1-byte moments a flipped bit) in place of Adam's math, over
 * the same tensors, split between threads the way fusedtrain's kernel splits them (each
 * thread a contiguous run of the concatenated elements). A step cannot take less time than
 * this, so it bounds what any Adam kernel (ours, torch's, DeepSpeed's) can gain here.
 *
 * Plain C and pthreads, built by stream_floor.py with the system compiler: no OpenMP, so no
 * second OpenMP runtime spins beside torch's between the timed calls. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
  float **p;
  void **m, **v;
  const float **g;
  const int64_t *n;
  int64_t ntensors, lo, hi; /* [lo, hi) of the concatenated elements */
  int state_bytes;          /* of one element of m and v: 4 (fp32), 2 or 1 */
} Range;

/* The moments' bytes read and written as integers of their width, their lowest bit flipped: the
 * optimizer whose states these are, timed beside the floor, sees them move by one code or ulp. */
#define INT_MOMENTS(T)                                                  \
  do {                                                                  \
    T *restrict mi = (T *)m, *restrict vi = (T *)v;                     \
    for (int64_t i = a; i < b; ++i) {                                   \
      const float gi = g[i];                                            \
      mi[i] ^= 1;                                                       \
      vi[i] ^= 1;                                                       \
      p[i] = 0.999f * p[i] - 1e-3f * gi;                                \
    }                                                                   \
  } while (0)

static void *run_range(void *arg) {
  const Range *r = (const Range *)arg;
  int64_t base = 0;
  for (int64_t t = 0; t < r->ntensors; base += r->n[t], ++t) {
    int64_t a = r->lo > base ? r->lo - base : 0;
    int64_t b = r->hi < base + r->n[t] ? r->hi - base : r->n[t];
    float *restrict p = r->p[t];
    void *m = r->m[t], *v = r->v[t];
    const float *restrict g = r->g[t];
    if (r->state_bytes == 2) {
      INT_MOMENTS(uint16_t);
    } else if (r->state_bytes == 1) {
      INT_MOMENTS(uint8_t);
    } else {
      float *restrict mf = (float *)m, *restrict vf = (float *)v;
      for (int64_t i = a; i < b; ++i) {
        const float gi = g[i];
        mf[i] = 0.9f * mf[i] + 0.1f * gi;
        vf[i] = 0.999f * vf[i] + 0.001f * gi * gi;
        p[i] = 0.999f * p[i] - 1e-3f * mf[i];
      }
    }
  }
  return NULL;
}

/* One pass over every element of every tensor with `threads` threads (the caller's included). */
int stream_floor(float **p, const float **g, void **m, void **v, const int64_t *n, int64_t ntensors,
                 int threads, int state_bytes) {
  int64_t total = 0;
  for (int64_t t = 0; t < ntensors; ++t) total += n[t];
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  Range ranges[64];
  pthread_t ids[64];
  for (int k = 0; k < threads; ++k) {
    Range r = {p, m, v, g, n, ntensors, total * k / threads, total * (k + 1) / threads, state_bytes};
    ranges[k] = r;
  }
  int started = 0;
  for (int k = 1; k < threads; ++k, ++started)
    if (pthread_create(&ids[k], NULL, run_range, &ranges[k]) != 0) break;
  run_range(&ranges[0]);
  for (int k = 1; k <= started; ++k) pthread_join(ids[k], NULL);
  return started + 1 == threads ? 0 : -1;
}
