// The ConvNet's CPU kernels, called through ctypes (kdd_mlflow/native.py) on contiguous tensors; no PyTorch headers,
// so the file builds in about a second.
//
// 1. Instance norm (affine) -> ReLU -> 2x2 average pool, fused: forward, backward, and the backward's own backward.
//
// One (sample, channel) group of M = H x W values fits in the first-level cache, so each kernel reads a group from
// memory once, does every per-group pass in cache, and writes its results once. The unfused layers make a dozen
// full-size passes through memory per block where these make two or three. Accumulation is in double.
//
// Notation per group: x^ = (z - mean) r, r = 1 / sqrt(var + eps), a = gamma x^ + beta (computed as z s + t with
// s = r gamma, t = beta - mean s, as the forward does), y = relu(a), p = pool(y). Upstream gradient of p: dp, so
// the gradient reaching the norm's output is dr = [a > 0] S(dp), S spreading each pooled value / 4 over its block.
//   backward:       dz = r gamma P(dr), P(t) = t - mean(t) - x^ mean(t x^);  dgamma = sum dr x^, dbeta = sum dr
//   its backward, given upstream u, v, w of (dz, dgamma, dbeta), with the mask's derivative zero almost everywhere:
//     d/d dr    = gamma r P(u) + v x^ + w,  and d/d dp = S^T([a > 0] d/d dr)
//     d/d gamma = sum dr r P(u)
//     d/d z     = -r^2 (mean(u P(a')) x^ + mean(a' x^) P(u) + mean(u x^) P(a')) + v r P(dr),  a' = gamma dr
// Positions outside the pooled region (odd H or W: the pool drops the last row or column) get dr = 0.

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline void stats(const T* zg, int64_t M, double eps, double& mean, double& rstd) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < M; ++i) s += zg[i];
  mean = s / M;
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < M; ++i) {
    const double d = zg[i] - mean;
    q += d * d;
  }
  rstd = 1.0 / std::sqrt(q / M + eps);
}

// e[j] = dp[i, j / 2] / 4 over the pooled columns, 0 past them (pooled row i; all 0 past the pooled rows)
template <typename T>
inline void expand_row(const T* dpg, int64_t i, int64_t H2, int64_t W2, int64_t W, T* e) {
  if (i >= H2) {
    for (int64_t j = 0; j < W; ++j) e[j] = T(0);
    return;
  }
  const T* row = dpg + i * W2;
  for (int64_t j = 0; j < W2; ++j) e[2 * j] = e[2 * j + 1] = row[j] * T(0.25);
  for (int64_t j = 2 * W2; j < W; ++j) e[j] = T(0);
}

// dr over a group, row by row into dr (M values); returns nothing, the caller reduces
template <typename T>
inline void spread_group(const T* zg, const T* dpg, int64_t H, int64_t W, int64_t H2, int64_t W2, T s, T t, T* e,
                         T* dr) {
  for (int64_t i = 0; i < H; ++i) {
    if (i % 2 == 0) expand_row(dpg, i / 2, H2, W2, W, e);
    const T* zr = zg + i * W;
    T* out = dr + i * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) out[j] = zr[j] * s + t > T(0) ? e[j] : T(0);
  }
}

template <typename T>
void forward(const T* z, const T* gamma, const T* beta, T* p, T* mean_out, T* rstd_out, int64_t N, int64_t C,
             int64_t H, int64_t W, double eps) {
  const int64_t H2 = H / 2, W2 = W / 2, M = H * W;
#pragma omp parallel
  {
    std::vector<T> rows(W);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < N * C; ++g) {
      const int64_t c = g % C;
      const T* zg = z + g * M;
      double mean, rstd;
      stats(zg, M, eps, mean, rstd);
      mean_out[g] = static_cast<T>(mean);
      rstd_out[g] = static_cast<T>(rstd);
      const T s = static_cast<T>(rstd) * gamma[c];
      const T t = beta[c] - static_cast<T>(mean) * s;
      T* pg = p + g * H2 * W2;
      T* b = rows.data();
      for (int64_t i = 0; i < H2; ++i) {
        const T* r0 = zg + 2 * i * W;
        const T* r1 = r0 + W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const T a0 = r0[j] * s + t, a1 = r1[j] * s + t;
          b[j] = (a0 < T(0) ? T(0) : a0) + (a1 < T(0) ? T(0) : a1);  // relu, NaN kept as clamp_min keeps it
        }
        T* out = pg + i * W2;
        for (int64_t j = 0; j < W2; ++j) out[j] = (b[2 * j] + b[2 * j + 1]) * T(0.25);
      }
    }
  }
}

template <typename T>
void backward(const T* dp, const T* z, const T* gamma, const T* beta, const T* mean, const T* rstd, T* dz, T* sd_out,
              T* sdx_out, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t H2 = H / 2, W2 = W / 2, M = H * W;
#pragma omp parallel
  {
    std::vector<T> expanded(W);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < N * C; ++g) {
      const int64_t c = g % C;
      const T* zg = z + g * M;
      T* dzg = dz + g * M;
      const T r = rstd[g], mu = mean[g];
      const T s = r * gamma[c], t = beta[c] - mu * s;
      spread_group(zg, dp + g * H2 * W2, H, W, H2, W2, s, t, expanded.data(), dzg);  // dr, in dz's place for now
      double sd = 0.0, sdx = 0.0;
#pragma omp simd reduction(+ : sd, sdx)
      for (int64_t k = 0; k < M; ++k) {
        sd += dzg[k];
        sdx += dzg[k] * ((zg[k] - mu) * r);
      }
      sd_out[g] = static_cast<T>(sd);
      sdx_out[g] = static_cast<T>(sdx);
      const T m_d = static_cast<T>(sd / M), m_dx = static_cast<T>(sdx / M);
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) dzg[k] = s * (dzg[k] - m_d - (zg[k] - mu) * r * m_dx);
    }
  }
}

template <typename T>
void double_backward(const T* u, const T* v, const T* w, const T* dp, const T* z, const T* gamma, const T* beta,
                     const T* mean, const T* rstd, const T* sd, const T* sdx, T* g_dp, T* g_z, T* g_gamma, int64_t N,
                     int64_t C, int64_t H, int64_t W) {
  const int64_t H2 = H / 2, W2 = W / 2, M = H * W;
#pragma omp parallel
  {
    std::vector<T> expanded(W), dr(M), q(W), pooled(W2 > 0 ? W2 : 1);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < N * C; ++g) {
      const int64_t c = g % C;
      const T* zg = z + g * M;
      const T* ug = u ? u + g * M : nullptr;
      const T r = rstd[g], mu = mean[g], gm = gamma[c];
      const T s = r * gm, t = beta[c] - mu * s;
      const T vv = v ? v[c] : T(0), ww = w ? w[c] : T(0);
      T* d = dr.data();
      spread_group(zg, dp + g * H2 * W2, H, W, H2, W2, s, t, expanded.data(), d);
      double su = 0.0, sux = 0.0, sud = 0.0;
      if (ug) {
#pragma omp simd reduction(+ : su, sux, sud)
        for (int64_t k = 0; k < M; ++k) {
          su += ug[k];
          sux += ug[k] * ((zg[k] - mu) * r);
          sud += ug[k] * d[k];
        }
      }
      const T m_u = static_cast<T>(su / M), m_ux = static_cast<T>(sux / M), m_ud = static_cast<T>(sud / M);
      const T m_d = static_cast<T>(sd[g] / M), m_dx = static_cast<T>(sdx[g] / M);
      const T a_mean = gm * m_d, ax_mean = gm * m_dx, upa = gm * m_ud - m_u * a_mean - m_ux * ax_mean;
      const T r2 = r * r, gr = gm * r, vr = vv * r;
      // d/d dr = gr u + dr_x x^ + dr_1;  d/d z = z_u u + z_d dr + z_x x^ + z_1
      const T dr_x = vv - gr * m_ux, dr_1 = ww - gr * m_u;
      const T z_u = -r2 * ax_mean, z_d = vr - r2 * m_ux * gm;
      const T z_x = -r2 * upa + T(2) * r2 * ax_mean * m_ux - vr * m_dx;
      const T z_1 = r2 * (ax_mean * m_u + m_ux * a_mean) - vr * m_d;
      if (g_gamma) g_gamma[g] = r * (m_ud - m_u * m_d - m_ux * m_dx) * static_cast<T>(M);
      if (g_z) {
        T* out = g_z + g * M;
        if (ug) {
#pragma omp simd
          for (int64_t k = 0; k < M; ++k) out[k] = z_u * ug[k] + z_d * d[k] + z_x * ((zg[k] - mu) * r) + z_1;
        } else {
#pragma omp simd
          for (int64_t k = 0; k < M; ++k) out[k] = z_d * d[k] + z_x * ((zg[k] - mu) * r) + z_1;
        }
      }
      if (g_dp) {
        T* out = g_dp + g * H2 * W2;
        T* qr = q.data();
        T* acc = pooled.data();
        for (int64_t i = 0; i < 2 * H2; ++i) {
          const T* zr = zg + i * W;
          const T* ur = ug ? ug + i * W : nullptr;
          if (ur) {
#pragma omp simd
            for (int64_t j = 0; j < W; ++j) {
              const T a = zr[j] * s + t;
              qr[j] = a > T(0) ? gr * ur[j] + dr_x * ((zr[j] - mu) * r) + dr_1 : T(0);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < W; ++j) {
              const T a = zr[j] * s + t;
              qr[j] = a > T(0) ? dr_x * ((zr[j] - mu) * r) + dr_1 : T(0);
            }
          }
          if (i % 2 == 0) {
            for (int64_t j = 0; j < W2; ++j) acc[j] = qr[2 * j] + qr[2 * j + 1];
          } else {
            T* o = out + (i / 2) * W2;
            for (int64_t j = 0; j < W2; ++j) o[j] = (acc[j] + qr[2 * j] + qr[2 * j + 1]) * T(0.25);
          }
        }
      }
    }
  }
}

}  // namespace

// 2. A 3 x 3 convolution with one input channel (MNIST and Fashion-MNIST's first layer), stride 1, on an input
// padded beforehand, and its weight gradient. oneDNN runs these at a fraction of its speed on more channels (at
// 100 x 1 x 28 x 28 -> 32 channels: 1.06 ms for the 59 MFLOP forward, 1.3 ms for the weight gradient as a batched
// matrix product over the input's windows); here every output, and every tap's partial sums, stay in registers.
//   forward:          y[n, c, i, j] = b[c] + sum_a,b w[c, a, b] x[n, i + a, j + b]      x: (N, Hp, Wp)
//   weight gradient:  dw[c, a, b] = sum_n,i,j dy[n, c, i, j] x[n, i + a, j + b],  db[c] = sum_n,i,j dy[n, c, i, j]
template <typename T>
void conv1_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t Hp, int64_t Wp) {
  const int64_t Ho = Hp - 2, Wo = Wp - 2;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N * C; ++g) {
    const int64_t n = g / C, c = g % C;
    const T* wc = w + c * 9;
    const T w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7], w8 = wc[8];
    const T bias = b ? b[c] : T(0);
    for (int64_t i = 0; i < Ho; ++i) {
      const T* x0 = x + n * Hp * Wp + i * Wp;
      const T *x1 = x0 + Wp, *x2 = x1 + Wp;
      T* row = y + g * Ho * Wo + i * Wo;
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j)
        row[j] = bias + w0 * x0[j] + w1 * x0[j + 1] + w2 * x0[j + 2] + w3 * x1[j] + w4 * x1[j + 1] + w5 * x1[j + 2] +
                 w6 * x2[j] + w7 * x2[j + 1] + w8 * x2[j + 2];
    }
  }
}

template <typename T>
void conv1_weight_grad(const T* dy, const T* x, T* dw, T* db, int64_t N, int64_t C, int64_t Hp, int64_t Wp) {
  constexpr int V = 64 / sizeof(T);  // one 512-bit register of lanes per tap
  const int64_t Ho = Hp - 2, Wo = Wp - 2;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    double total[10] = {0};
    for (int64_t n = 0; n < N; ++n) {
      T acc[10][V] = {};  // a sample's partial sums per tap (and the bias) in T, their totals in double
      T rest[10] = {};
      for (int64_t i = 0; i < Ho; ++i) {
        const T* d = dy + (n * C + c) * Ho * Wo + i * Wo;
        const T* x0 = x + n * Hp * Wp + i * Wp;
        const T *x1 = x0 + Wp, *x2 = x1 + Wp;
        int64_t j = 0;
        for (; j + V <= Wo; j += V) {
#pragma omp simd
          for (int l = 0; l < V; ++l) {
            const T g = d[j + l];
            acc[0][l] += g * x0[j + l], acc[1][l] += g * x0[j + l + 1], acc[2][l] += g * x0[j + l + 2];
            acc[3][l] += g * x1[j + l], acc[4][l] += g * x1[j + l + 1], acc[5][l] += g * x1[j + l + 2];
            acc[6][l] += g * x2[j + l], acc[7][l] += g * x2[j + l + 1], acc[8][l] += g * x2[j + l + 2];
            acc[9][l] += g;
          }
        }
        for (; j < Wo; ++j) {
          const T g = d[j];
          rest[0] += g * x0[j], rest[1] += g * x0[j + 1], rest[2] += g * x0[j + 2];
          rest[3] += g * x1[j], rest[4] += g * x1[j + 1], rest[5] += g * x1[j + 2];
          rest[6] += g * x2[j], rest[7] += g * x2[j + 1], rest[8] += g * x2[j + 2];
          rest[9] += g;
        }
      }
      for (int k = 0; k < 10; ++k) {
        T s = rest[k];
        for (int l = 0; l < V; ++l) s += acc[k][l];
        total[k] += s;
      }
    }
    for (int k = 0; k < 9; ++k) dw[c * 9 + k] = static_cast<T>(total[k]);
    if (db) db[c] = static_cast<T>(total[9]);
  }
}

#define KDD_EXPORT(T, SUFFIX)                                                                                      \
  extern "C" void nrp_forward_##SUFFIX(const T* z, const T* gamma, const T* beta, T* p, T* mean, T* rstd,           \
                                       int64_t N, int64_t C, int64_t H, int64_t W, double eps) {                    \
    forward<T>(z, gamma, beta, p, mean, rstd, N, C, H, W, eps);                                                   \
  }                                                                                                              \
  extern "C" void nrp_backward_##SUFFIX(const T* dp, const T* z, const T* gamma, const T* beta, const T* mean,      \
                                        const T* rstd, T* dz, T* sd, T* sdx, int64_t N, int64_t C, int64_t H,      \
                                        int64_t W) {                                                             \
    backward<T>(dp, z, gamma, beta, mean, rstd, dz, sd, sdx, N, C, H, W);                                          \
  }                                                                                                              \
  extern "C" void nrp_double_backward_##SUFFIX(const T* u, const T* v, const T* w, const T* dp, const T* z,         \
                                               const T* gamma, const T* beta, const T* mean, const T* rstd,         \
                                               const T* sd, const T* sdx, T* g_dp, T* g_z, T* g_gamma, int64_t N,   \
                                               int64_t C, int64_t H, int64_t W) {                                 \
    double_backward<T>(u, v, w, dp, z, gamma, beta, mean, rstd, sd, sdx, g_dp, g_z, g_gamma, N, C, H, W);          \
  }

#define KDD_EXPORT_CONV1(T, SUFFIX)                                                                                \
  extern "C" void conv1_forward_##SUFFIX(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t Hp,  \
                                         int64_t Wp) {                                                             \
    conv1_forward<T>(x, w, b, y, N, C, Hp, Wp);                                                                  \
  }                                                                                                              \
  extern "C" void conv1_weight_grad_##SUFFIX(const T* dy, const T* x, T* dw, T* db, int64_t N, int64_t C,           \
                                             int64_t Hp, int64_t Wp) {                                             \
    conv1_weight_grad<T>(dy, x, dw, db, N, C, Hp, Wp);                                                           \
  }

KDD_EXPORT(float, f32)
KDD_EXPORT(double, f64)
KDD_EXPORT_CONV1(float, f32)
KDD_EXPORT_CONV1(double, f64)
