// CPU alpha compositing of projected 2D Gaussians (gsplat 1.4.0 `rasterize_to_pixels`
// semantics, non-packed), with a hand-written backward pass.
//
// Forward: every (camera, tile) is one task; a task walks its tile's depth-sorted list
// once, Gaussian by Gaussian, and only visits the pixels of the tile that the Gaussian can
// reach (its alpha >= 1/255 footprint, computed conservatively from the conic once per
// Gaussian), keeping per-pixel state (T, accumulated colour, last index, done flag) in a
// small tile-local buffer.  The pixels of one footprint row are processed kL at a time as
// lane vectors (sigma, exp, alpha, transmittance and the per-pixel decisions as lane masks).
// Per pixel the Gaussians are still taken strictly in list order, so the result is the same
// as gsplat's pixel-major loop.
//
// Backward: same tiling, walking the list back to front from the tile's largest "last
// index"; each pixel recovers its transmittance by dividing T_final by (1 - alpha), with the
// very same float expressions as the forward pass (so it takes the same decisions).  The
// gradient of one (tile, Gaussian) pair, summed over the tile's pixels (kL per-lane partial
// sums, then a fixed pairwise order), is written to its own row of an [n_isects, R] buffer
// (no races); the rows are then summed per Gaussian in intersection order (in double).
// Result: bitwise deterministic, independent of the number of threads and of the vector
// instructions the build targets.
//
// Built JIT by pepeseg3d_ns/render/cpu_backend.py (-O3 -ffp-contract=off -fopenmp, and
// -march=native when the compiler accepts it; no CUDA).  Registered as torch ops
// `torch.ops.pepeseg3d_cpu.*` (no pybind11: keeps the compile short).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

template <typename S>
struct Consts;
template <>
struct Consts<float> {
    static constexpr float kAlphaMax = 0.999f;
    static constexpr float kAlphaMin = 1.f / 255.f;
};
template <>
struct Consts<double> {
    static constexpr double kAlphaMax = 0.999;
    static constexpr double kAlphaMin = 1.0 / 255.0;
};
// gsplat compares the float next_T against the double literal 1e-4.
constexpr double kTMin = 1e-4;

// Threads for a tile loop.  Small jobs run serially: waking a pool costs little, but on a
// loaded machine a barrier can wait milliseconds for a descheduled worker.
int num_threads(int64_t ntask, int64_t work) {
    if (at::in_parallel_region() || ntask < 2 || work < 100000) return 1;
    return (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
}

// ---------------------------------------------------------------------------------------
// Lane vectors.  The pixel loops work on kL consecutive pixels of one tile row at a
// time, written with GCC/clang vector extensions: the compiler maps them onto whatever the
// build targets (AVX-512, AVX2, SSE2, NEON), and since every lane operation is a plain IEEE
// operation (no reassociation, -ffp-contract=off), a portable and a -march=native build of
// this file compute bitwise the same numbers.  kL is fixed (not taken from the target):
// the per-lane partial sums of the backward pass, and so its rounding, must not depend on it.
// 8 lanes measured faster than 4 or 16 for footprints of a few pixels (docs/benchmarks.md).

#ifndef PEPE_LANES
#define PEPE_LANES 8
#endif
constexpr int kL = PEPE_LANES;

template <typename S>
struct Lanes;
template <>
struct Lanes<float> {
    using I = int32_t;  // index / mask element of the same width as the float
    typedef float V __attribute__((vector_size(kL * 4)));
    typedef int32_t M __attribute__((vector_size(kL * 4)));
    typedef uint32_t UV __attribute__((vector_size(kL * 4)));
};
template <>
struct Lanes<double> {
    using I = int64_t;
    typedef double V __attribute__((vector_size(kL * 8)));
    typedef int64_t M __attribute__((vector_size(kL * 8)));
    typedef uint64_t UV __attribute__((vector_size(kL * 8)));
};

template <typename Vec, typename T>
inline Vec vload(const T *p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
}
template <typename Vec, typename T>
inline void vstore(T *p, const Vec &v) {
    std::memcpy(p, &v, sizeof(Vec));
}
template <typename Vec, typename T, size_t... Is>
inline Vec splat_impl(T x, std::index_sequence<Is...>) {
    return Vec{((void)Is, x)...};  // one broadcast instruction
}
template <typename Vec, typename T>
inline Vec splat(T x) {
    return splat_impl<Vec>(x, std::make_index_sequence<kL>{});
}
// m ? a : b, lane by lane (m lanes are all-ones or all-zeros).
template <typename Vec, typename Msk>
inline Vec sel(Msk m, Vec a, Vec b) {
    return (Vec)(((Msk)a & m) | ((Msk)b & ~m));
}
// Any lane set: OR-fold to 16 bytes with vector ops, then one movemask (SSE2) or two words.
template <typename Msk>
inline bool any(Msk m) {
    typedef int32_t Q __attribute__((vector_size(16)));
    Q q;
    std::memcpy(&q, &m, 16);
    for (size_t o = 16; o < sizeof(Msk); o += 16) {
        Q h;
        std::memcpy(&h, reinterpret_cast<const char *>(&m) + o, 16);
        q |= h;
    }
#if defined(__SSE2__)
    __m128i x;
    std::memcpy(&x, &q, 16);
    return _mm_movemask_epi8(x) != 0;
#else
    uint64_t w[2];
    std::memcpy(w, &q, 16);
    return (w[0] | w[1]) != 0;
#endif
}
// Set lanes as a bit mask (lane l = bit l).
template <typename Msk>
inline uint32_t lane_bits(Msk m) {
    typename std::remove_reference<decltype(m[0])>::type a[kL];
    std::memcpy(a, &m, sizeof(Msk));
    uint32_t b = 0;
    for (int l = 0; l < kL; ++l) b |= (uint32_t)(a[l] != 0) << l;
    return b;
}
static_assert(kL >= 4 && kL <= 32 && (kL & (kL - 1)) == 0, "PEPE_LANES: a power of two in [4, 32]");

template <typename Msk>
inline int popcount(Msk m) {
    int n = 0;
    for (int l = 0; l < kL; ++l) n += (m[l] != 0);
    return n;
}
// Fixed-order (pairwise) sum of the lanes.
template <typename S, typename Vec>
inline S hsum(Vec v) {
    S a[kL];
    std::memcpy(a, &v, sizeof(Vec));
    for (int w = kL / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) a[l] += a[l + w];
    return a[0];
}

// exp(-sigma) per lane.  float: Cody-Waite range reduction and a degree-6 polynomial
// (Cephes' expf coefficients, ~1 ulp), plain mul/add so that it vectorises and gives the
// same bits on every target; arguments are clamped to [-88, 87.3] (exp(-87.3) ~ 1.2e-38 is
// far below any alpha threshold).  double: libm's exp, lane by lane (the float64 path exists
// for gradcheck and tests; it keeps the scalar code's exp exactly).
inline Lanes<float>::V exp_neg(Lanes<float>::V sigma) {
    using L = Lanes<float>;
    using V = L::V;
    using UV = L::UV;
    V x = -sigma;
    x = sel((L::M)(x > splat<V>(88.0f)), splat<V>(88.0f), x);
    x = sel((L::M)(x < splat<V>(-87.3f)), splat<V>(-87.3f), x);
    const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V t = x * splat<V>(1.44269504088896341f) + magic;
    const V n = t - magic;
    V r = x - n * splat<V>(0.693359375f);
    r = r - n * splat<V>(-2.12194440e-4f);
    V p = splat<V>(1.9875691500e-4f);
    p = p * r + splat<V>(1.3981999507e-3f);
    p = p * r + splat<V>(8.3334519073e-3f);
    p = p * r + splat<V>(4.1665795894e-2f);
    p = p * r + splat<V>(1.6666665459e-1f);
    p = p * r + splat<V>(5.0000001201e-1f);
    const V y = p * (r * r) + r + splat<V>(1.0f);
    // 2^n: the low bits of t hold n (two's complement); shift them into the exponent field
    const UV scale = ((UV)t << 23) + splat<UV>(0x3f800000u);
    return y * (V)scale;
}
inline Lanes<double>::V exp_neg(Lanes<double>::V sigma) {
    Lanes<double>::V r;
    for (int l = 0; l < kL; ++l) r[l] = std::exp(-sigma[l]);
    return r;
}

// Largest S not above gsplat's double cut-off 1e-4: for S values, x <= kTMin <=> x <= this.
template <typename S>
inline S tmin_threshold() {
    S t = (S)kTMin;
    if ((double)t > kTMin) t = std::nextafter(t, S(0));
    return t;
}

// ---------------------------------------------------------------------------------------
// Geometry shared by forward and backward.

struct Geom {
    int64_t C, N, H, W, ts, TH, TW, M;
};

struct Box {
    int r0, r1, c0, c1;  // tile-local pixel rows/cols, half-open
};

// One Gaussian's parameters, packed so that a list entry reads one cache line, with its
// footprint in image pixels: the pixels where it may reach alpha >= 1/255 (computed from the
// conic, conservatively, in double, once per Gaussian) and `s_skip`, a per-pixel early
// reject on sigma (sigma > s_skip implies alpha < 1/255 for the very same sigma).
template <typename S>
struct GPar {
    S mx, my, a, b, c, op, s_skip;
    int32_t x0, x1, y0, y1;  // image pixel columns [x0, x1), rows [y0, y1)
};

constexpr double kBig = 1073741824.0;

// A tile's list visits Gaussians in depth order, i.e. at random in memory: fetch a few ahead.
constexpr int kPrefetch = 4;
template <typename T>
inline void prefetch(const T *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p);
    __builtin_prefetch(reinterpret_cast<const char *>(p) + sizeof(T) - 1);
#endif
}  // 2^30: pixel bounds are clamped to +-this

template <typename S>
inline GPar<S> gaussian_params(S mx, S my, S a, S b, S c, S op) {
    GPar<S> g{mx, my, a, b, c, op, S(0), 0, 0, 0, 0};
    if (!(op >= Consts<S>::kAlphaMin)) return g;  // empty: alpha <= op < 1/255 when sigma >= 0
    const int32_t whole = (int32_t)kBig;
    const double s = std::log(255.0 * (double)op);  // alpha >= 1/255  <=>  sigma <= s
    const double da = a, db = b, dc = c;
    const double det = da * dc - db * db;
    if (!(da > 0.0) || !(det > 0.0) || !std::isfinite(s) || !std::isfinite(det) ||
        !std::isfinite((double)mx) || !std::isfinite((double)my)) {
        // not positive definite: every pixel of the tile, no skip
        g.s_skip = std::numeric_limits<S>::infinity();
        g.x0 = g.y0 = -whole;
        g.x1 = g.y1 = whole;
        return g;
    }
    g.s_skip = (S)(s + 1e-3);
    // float rounding of sigma grows with the conic's condition (a*c/det); widen accordingly.
    const double kappa = da * dc / det;
    const double sb = (std::max(s, 0.0) + 1e-3) * (1.001 + 4e-6 * kappa);
    const double rx = std::sqrt(2.0 * sb * dc / det);
    const double ry = std::sqrt(2.0 * sb * da / det);
    if (!std::isfinite(rx) || !std::isfinite(ry)) {
        g.x0 = g.y0 = -whole;
        g.x1 = g.y1 = whole;
        return g;
    }
    // pixel column j (centre j + 0.5) can be reached iff |j + 0.5 - mx| <= rx
    auto clampi = [](double v) { return (int32_t)std::max(-kBig, std::min(kBig, v)); };
    g.x0 = clampi(std::ceil((double)mx - rx - 0.5));
    g.x1 = clampi(std::floor((double)mx + rx - 0.5) + 1.0);
    g.y0 = clampi(std::ceil((double)my - ry - 0.5));
    g.y1 = clampi(std::floor((double)my + ry - 0.5) + 1.0);
    return g;
}

// The Gaussian's footprint in the tile at (x0, y0) of pw x ph pixels; false when empty.
template <typename S>
inline bool tile_box(const GPar<S> &g, int x0, int y0, int pw, int ph, Box &box) {
    auto cl = [](int64_t v, int hi) { return (int)std::max<int64_t>(0, std::min<int64_t>(hi, v)); };
    box.c0 = cl((int64_t)g.x0 - x0, pw);
    box.c1 = cl((int64_t)g.x1 - x0, pw);
    box.r0 = cl((int64_t)g.y0 - y0, ph);
    box.r1 = cl((int64_t)g.y1 - y0, ph);
    return box.c0 < box.c1 && box.r0 < box.r1;
}

// Per-Gaussian parameters of all C*N Gaussians (a parallel pass; each entry is a pure
// function of its Gaussian, so the result does not depend on the thread count).
template <typename S>
std::vector<GPar<S>> all_params(const Geom &G, const S *means, const S *conics, const S *opac) {
    const int64_t CN = G.C * G.N;
    std::vector<GPar<S>> par(std::max<int64_t>(CN, 1));
    const int nthreads = num_threads(CN, CN * 8);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (int64_t g = 0; g < CN; ++g)
        par[g] = gaussian_params<S>(means[2 * g], means[2 * g + 1], conics[3 * g], conics[3 * g + 1],
                                    conics[3 * g + 2], opac[g]);
    (void)nthreads;
    return par;
}

// Same float expression (and evaluation order) as gsplat.
template <typename X, typename Y>
inline X sigma_of(Y a, Y b, Y c, X dx, X dy) {
    return Y(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy;
}

inline void tile_range(const int32_t *offsets, const Geom &g, int64_t task, int64_t &rs,
                       int64_t &re) {
    rs = offsets[task];
    re = (task + 1 < g.C * g.TH * g.TW) ? (int64_t)offsets[task + 1] : g.M;
}

// Tile-local per-thread buffers are padded by kL elements: the last chunk of a row may
// read (and write back unchanged) up to kL - 1 elements past the tile.
inline size_t padded(int npix) { return (size_t)npix + kL; }

// ---------------------------------------------------------------------------------------
// Forward
//
// PLANAR: the tile's colour accumulator is stored channel-major ([D][pixel]) and updated
// kL pixels at a time (few channels: RGB, RGB+D, depth); otherwise pixel-major
// ([pixel][D]) and updated per contributing pixel, vectorised over the channels (features).

template <typename S, int DC, bool PLANAR>
void forward_impl(const Geom &G, int Dr, const GPar<S> *par, const S *colors, const S *bg,
                  const int32_t *offsets, const int32_t *flat, S *out_c, S *out_a, S *out_t,
                  int32_t *out_last) {
    using L = Lanes<S>;
    using V = typename L::V;
    using M = typename L::M;
    using I = typename L::I;
    const int D = DC > 0 ? DC : Dr;
    const int64_t ntask = G.C * G.TH * G.TW;
    const int ts = (int)G.ts;
    const int npix = ts * ts;
    const size_t ps = padded(npix);  // channel stride of the planar accumulator
    const int nthreads = num_threads(ntask, G.M * 16 + G.C * G.H * G.W);
    const S tmin = tmin_threshold<S>();
    M iota;
    for (int l = 0; l < kL; ++l) iota[l] = (I)l;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        std::vector<S> T(ps), acc(ps * D), pxc((size_t)ts + kL);
        std::vector<I> last(ps), done(ps);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < ntask; ++task) {
            const int64_t cam = task / (G.TH * G.TW);
            const int64_t tile = task % (G.TH * G.TW);
            const int ty = (int)(tile / G.TW), tx = (int)(tile % G.TW);
            const int y0 = ty * ts, x0 = tx * ts;
            const int ph = (int)std::min<int64_t>(ts, G.H - y0);
            const int pw = (int)std::min<int64_t>(ts, G.W - x0);
            if (ph <= 0 || pw <= 0) continue;
            const int np = ph * pw;
            std::fill(T.begin(), T.end(), S(1));
            std::fill(acc.begin(), acc.end(), S(0));
            std::fill(last.begin(), last.end(), I(-1));
            std::fill(done.begin(), done.end(), I(0));
            for (int q = 0; q < ts + kL; ++q) pxc[q] = (S)(x0 + q) + S(0.5);  // pixel centres
            int active = np;

            int64_t rs, re;
            tile_range(offsets, G, task, rs, re);
            for (int64_t idx = rs; idx < re && active > 0; ++idx) {
                if (idx + kPrefetch < re) prefetch(&par[flat[idx + kPrefetch]]);
                const GPar<S> &g = par[flat[idx]];
                Box bx;
                if (!tile_box(g, x0, y0, pw, ph, bx)) continue;
                const S *col = colors + (int64_t)flat[idx] * D;
                const V vmx = splat<V>(g.mx), vop = splat<V>(g.op), vskip = splat<V>(g.s_skip);
                const M vidx = splat<M>((I)idx);
                for (int r = bx.r0; r < bx.r1; ++r) {
                    const S dy = g.my - ((S)(y0 + r) + S(0.5));
                    const V vdy = splat<V>(dy);
                    for (int q0 = bx.c0; q0 < bx.c1; q0 += kL) {
                        const int p0 = r * pw + q0;
                        const M dn = vload<M>(done.data() + p0);
                        M m = (M)(iota < splat<M>((I)(bx.c1 - q0))) & ~dn;
                        if (!any(m)) continue;
                        const V dx = vmx - vload<V>(pxc.data() + q0);
                        const V sigma = sigma_of<V, S>(g.a, g.b, g.c, dx, vdy);
                        m &= ~(M)(sigma > vskip) & ~(M)(sigma < splat<V>(S(0)));
                        const V ex = exp_neg(sigma);
                        V alpha = vop * ex;
                        const V amax = splat<V>(Consts<S>::kAlphaMax);
                        alpha = sel((M)(alpha < amax), alpha, amax);  // std::min(0.999, .)
                        m &= ~(M)(alpha < splat<V>(Consts<S>::kAlphaMin));
                        if (!any(m)) continue;
                        const V t = vload<V>(T.data() + p0);
                        const V next_t = t * (splat<V>(S(1)) - alpha);
                        // saturated: the pixel stops, this Gaussian is not included
                        const M stop = m & (M)(next_t <= splat<V>(tmin));
                        const M use = m & ~stop;
                        if (any(stop)) {
                            vstore(done.data() + p0, dn | stop);
                            active -= popcount(stop);
                        }
                        if (!any(use)) continue;
                        const V vis = alpha * t;
                        vstore(T.data() + p0, sel(use, next_t, t));
                        vstore(last.data() + p0, sel(use, vidx, vload<M>(last.data() + p0)));
                        if (PLANAR) {
                            for (int k = 0; k < D; ++k) {
                                S *ap = acc.data() + k * ps + p0;
                                const V av = vload<V>(ap);
                                vstore(ap, sel(use, av + splat<V>(col[k]) * vis, av));
                            }
                        } else {
                            S w_l[kL];
                            vstore(w_l, vis);
                            for (uint32_t bits = lane_bits(use); bits; bits &= bits - 1) {
                                const int l = __builtin_ctz(bits);
                                const S w = w_l[l];
                                S *ap = acc.data() + (size_t)(p0 + l) * D;
                                for (int k = 0; k < D; ++k) ap[k] += col[k] * w;
                            }
                        }
                    }
                }
            }

            const S *bgc = bg ? bg + cam * D : nullptr;
            for (int r = 0; r < ph; ++r) {
                for (int q = 0; q < pw; ++q) {
                    const int p = r * pw + q;
                    const int64_t pix = (cam * G.H + y0 + r) * G.W + x0 + q;
                    const S t = T[p];
                    S *o = out_c + pix * D;
                    for (int k = 0; k < D; ++k) {
                        const S a = PLANAR ? acc[k * ps + p] : acc[(size_t)p * D + k];
                        o[k] = bgc ? a + t * bgc[k] : a;
                    }
                    out_a[pix] = S(1) - t;
                    out_t[pix] = t;
                    out_last[pix] = (int32_t)last[p];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward

// The per-channel work of one (pixel, Gaussian) pair, back to front (pixel-major layout):
//   vr += fac * vc;  returns sum_k (col_k * t - bp_k * ra) * vc_k;  bp += col * fac.
// The sum is split over 8 lanes so that the compiler can vectorise it (a strict-order float
// reduction does not vectorise); the order is fixed, so results stay deterministic.
template <typename S, int DC>
inline S channel_pass(int Dr, const S *__restrict__ col, const S *__restrict__ vc,
                      S *__restrict__ bp, S *__restrict__ vr, S t, S ra, S fac) {
    const int D = DC > 0 ? DC : Dr;
    if (D < 8) {
        S v = S(0);
        for (int k = 0; k < D; ++k) {
            vr[k] += fac * vc[k];
            v += (col[k] * t - bp[k] * ra) * vc[k];
            bp[k] += col[k] * fac;
        }
        return v;
    }
    S lane[8] = {S(0), S(0), S(0), S(0), S(0), S(0), S(0), S(0)};
    int k = 0;
    for (; k + 8 <= D; k += 8) {
        for (int l = 0; l < 8; ++l) {
            vr[k + l] += fac * vc[k + l];
            lane[l] += (col[k + l] * t - bp[k + l] * ra) * vc[k + l];
            bp[k + l] += col[k + l] * fac;
        }
    }
    for (int l = 0; k < D; ++k, ++l) {
        vr[k] += fac * vc[k];
        lane[l] += (col[k] * t - bp[k] * ra) * vc[k];
        bp[k] += col[k] * fac;
    }
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

constexpr int kPlanarMaxD = 4;  // PLANAR layout for D <= this

template <typename S, int DC, bool PLANAR>
void backward_tiles(const Geom &G, int Dr, int R, bool absgrad, const GPar<S> *par,
                    const S *colors, const S *bg, const int32_t *offsets, const int32_t *flat,
                    const S *t_final, const int32_t *last_ids, const S *v_out_c,
                    const S *v_out_a, const int64_t *slot, S *rows) {
    using L = Lanes<S>;
    using V = typename L::V;
    using M = typename L::M;
    using I = typename L::I;
    const int D = DC > 0 ? DC : Dr;
    const int64_t ntask = G.C * G.TH * G.TW;
    const int ts = (int)G.ts;
    const int npix = ts * ts;
    const size_t ps = padded(npix);
    const int nthreads = num_threads(ntask, G.M * 16 + G.C * G.H * G.W);
    M iota;
    for (int l = 0; l < kL; ++l) iota[l] = (I)l;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        // PLANAR: vcpl / buf are [D][pixel]; otherwise buf is [pixel][D] and v_out_c is read in place
        std::vector<S> T(ps), Tf(ps), va(ps), bgdot(ps), buf(ps * D), pxc((size_t)ts + kL);
        std::vector<S> vcpl(PLANAR ? ps * D : 0);
        std::vector<I> bin(ps);
        std::vector<S> vrgb(D), tl(kL), ral(kL), facl(kL), val(kL);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < ntask; ++task) {
            int64_t rs, re;
            tile_range(offsets, G, task, rs, re);
            if (re <= rs) continue;
            const int64_t cam = task / (G.TH * G.TW);
            const int64_t tile = task % (G.TH * G.TW);
            const int ty = (int)(tile / G.TW), tx = (int)(tile % G.TW);
            const int y0 = ty * ts, x0 = tx * ts;
            const int ph = (int)std::max<int64_t>(0, std::min<int64_t>(ts, G.H - y0));
            const int pw = (int)std::max<int64_t>(0, std::min<int64_t>(ts, G.W - x0));
            const int np = ph * pw;
            const S *bgc = bg ? bg + cam * D : nullptr;

            int64_t max_bin = -1;
            std::fill(bin.begin(), bin.end(), I(-1));  // padding lanes never take part
            for (int r = 0; r < ph; ++r) {
                for (int q = 0; q < pw; ++q) {
                    const int p = r * pw + q;
                    const int64_t pix = (cam * G.H + y0 + r) * G.W + x0 + q;
                    T[p] = Tf[p] = t_final[pix];
                    va[p] = v_out_a[pix];
                    bin[p] = (I)last_ids[pix];
                    max_bin = std::max<int64_t>(max_bin, last_ids[pix]);
                    const S *vc = v_out_c + pix * D;
                    S dot = S(0);
                    if (bgc)
                        for (int k = 0; k < D; ++k) dot += bgc[k] * vc[k];
                    bgdot[p] = dot;
                    if (PLANAR)
                        for (int k = 0; k < D; ++k) vcpl[k * ps + p] = vc[k];
                }
            }
            std::fill(buf.begin(), buf.begin() + (PLANAR ? ps * D : (size_t)np * D), S(0));
            for (int q = 0; q < ts + kL; ++q) pxc[q] = (S)(x0 + q) + S(0.5);

            // rows of Gaussians behind every pixel's last contributor get zero gradient
            const int64_t start = std::max<int64_t>(rs - 1, std::min<int64_t>(re - 1, max_bin));
            for (int64_t idx = re - 1; idx > start; --idx)
                std::fill(rows + slot[idx] * R, rows + (slot[idx] + 1) * R, S(0));

            for (int64_t idx = start; idx >= rs; --idx) {
                S *row = rows + slot[idx] * R;
                const int64_t gid = flat[idx];
                if (idx - kPrefetch >= rs) prefetch(&par[flat[idx - kPrefetch]]);
                const GPar<S> &g = par[gid];
                Box bx;
                if (!tile_box(g, x0, y0, pw, ph, bx)) {
                    std::fill(row, row + R, S(0));
                    continue;
                }
                const S *__restrict__ col = colors + gid * D;
                const V zero = splat<V>(S(0));
                V vx = zero, vy = zero, vca = zero, vcb = zero, vcc = zero, vop = zero, ax = zero,
                  ay = zero;
                V vrl[kPlanarMaxD];
                for (int k = 0; k < kPlanarMaxD; ++k) vrl[k] = zero;
                if (!PLANAR) std::fill(vrgb.begin(), vrgb.end(), S(0));
                const V vmx = splat<V>(g.mx), vopac = splat<V>(g.op), vskip = splat<V>(g.s_skip);
                const V amax = splat<V>(Consts<S>::kAlphaMax);
                const M vidx = splat<M>((I)idx);
                for (int r = bx.r0; r < bx.r1; ++r) {
                    const S dy = g.my - ((S)(y0 + r) + S(0.5));
                    const V vdy = splat<V>(dy);
                    for (int q0 = bx.c0; q0 < bx.c1; q0 += kL) {
                        const int p0 = r * pw + q0;
                        M m = (M)(iota < splat<M>((I)(bx.c1 - q0))) & ~(M)(vidx > vload<M>(bin.data() + p0));
                        if (!any(m)) continue;
                        const V dx = vmx - vload<V>(pxc.data() + q0);
                        const V sigma = sigma_of<V, S>(g.a, g.b, g.c, dx, vdy);
                        m &= ~(M)(sigma > vskip) & ~(M)(sigma < zero);
                        const V vis = exp_neg(sigma);
                        const V ov = vopac * vis;
                        const V alpha = sel((M)(ov < amax), ov, amax);
                        m &= ~(M)(alpha < splat<V>(Consts<S>::kAlphaMin));
                        if (!any(m)) continue;

                        const V ra = splat<V>(S(1)) / (splat<V>(S(1)) - alpha);
                        const V T0 = vload<V>(T.data() + p0);
                        const V t = T0 * ra;  // transmittance in front of this Gaussian
                        vstore(T.data() + p0, sel(m, t, T0));
                        const V fac = alpha * t;
                        V v_alpha;
                        if (PLANAR) {
                            v_alpha = zero;
                            for (int k = 0; k < D; ++k) {
                                const V colk = splat<V>(col[k]);
                                const V vck = vload<V>(vcpl.data() + k * ps + p0);
                                S *bpp = buf.data() + k * ps + p0;
                                const V bp = vload<V>(bpp);
                                vrl[k] += sel(m, fac * vck, zero);
                                v_alpha += (colk * t - bp * ra) * vck;
                                vstore(bpp, sel(m, bp + colk * fac, bp));
                            }
                        } else {
                            vstore(tl.data(), t);
                            vstore(ral.data(), ra);
                            vstore(facl.data(), fac);
                            std::fill(val.begin(), val.end(), S(0));
                            for (uint32_t bits = lane_bits(m); bits; bits &= bits - 1) {
                                const int l = __builtin_ctz(bits);
                                const int p = p0 + l;
                                const int64_t pix = (cam * G.H + y0 + r) * G.W + x0 + q0 + l;
                                val[l] = channel_pass<S, DC>(D, col, v_out_c + pix * D,
                                                             buf.data() + (size_t)p * D,
                                                             vrgb.data(), tl[l], ral[l], facl[l]);
                            }
                            v_alpha = vload<V>(val.data());
                        }
                        const V tf = vload<V>(Tf.data() + p0);
                        v_alpha += tf * ra * vload<V>(va.data() + p0);
                        if (bgc) v_alpha += -tf * ra * vload<V>(bgdot.data() + p0);

                        // no gradient through the clamp
                        const M gm = m & (M)(ov <= amax);
                        const V v_sigma = -vopac * vis * v_alpha;
                        vca += sel(gm, S(0.5) * v_sigma * dx * dx, zero);
                        vcb += sel(gm, v_sigma * dx * vdy, zero);
                        vcc += sel(gm, S(0.5) * v_sigma * vdy * vdy, zero);
                        const V gx = v_sigma * (splat<V>(g.a) * dx + splat<V>(g.b) * vdy);
                        const V gy = v_sigma * (splat<V>(g.b) * dx + splat<V>(g.c) * vdy);
                        vx += sel(gm, gx, zero);
                        vy += sel(gm, gy, zero);
                        if (absgrad) {
                            ax += sel(gm, sel((M)(gx < zero), -gx, gx), zero);
                            ay += sel(gm, sel((M)(gy < zero), -gy, gy), zero);
                        }
                        vop += sel(gm, vis * v_alpha, zero);
                    }
                }
                row[0] = hsum<S>(vx);
                row[1] = hsum<S>(vy);
                row[2] = hsum<S>(vca);
                row[3] = hsum<S>(vcb);
                row[4] = hsum<S>(vcc);
                row[5] = hsum<S>(vop);
                for (int k = 0; k < D; ++k) row[6 + k] = PLANAR ? hsum<S>(vrl[k]) : vrgb[k];
                if (absgrad) {
                    row[6 + D] = hsum<S>(ax);
                    row[7 + D] = hsum<S>(ay);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Argument checks (the Python wrapper raises friendlier errors first).

void check_inputs(const Tensor &means2d, const Tensor &conics, const Tensor &colors,
                  const Tensor &opacities, const c10::optional<Tensor> &backgrounds,
                  int64_t width, int64_t height, int64_t tile_size, const Tensor &offsets,
                  const Tensor &flat) {
    TORCH_CHECK(means2d.device().is_cpu(), "pepeseg3d_cpu: tensors must be on the CPU");
    const auto st = means2d.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, "pepeseg3d_cpu: float32 or float64 only");
    TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [C, N, 2]");
    const int64_t C = means2d.size(0), N = means2d.size(1);
    TORCH_CHECK(conics.sizes() == at::IntArrayRef({C, N, 3}), "conics must be [C, N, 3]");
    TORCH_CHECK(colors.dim() == 3 && colors.size(0) == C && colors.size(1) == N &&
                    colors.size(2) >= 1,
                "colors must be [C, N, D]");
    TORCH_CHECK(opacities.sizes() == at::IntArrayRef({C, N}), "opacities must be [C, N]");
    for (const Tensor *t : {&means2d, &conics, &colors, &opacities}) {
        TORCH_CHECK(t->scalar_type() == st && t->is_contiguous() && t->device().is_cpu(),
                    "pepeseg3d_cpu: inputs must be contiguous CPU tensors of one dtype");
    }
    if (backgrounds.has_value()) {
        const Tensor &bg = *backgrounds;
        TORCH_CHECK(bg.sizes() == at::IntArrayRef({C, colors.size(2)}),
                    "backgrounds must be [C, D]");
        TORCH_CHECK(bg.scalar_type() == st && bg.is_contiguous() && bg.device().is_cpu(),
                    "backgrounds: contiguous CPU tensor of the colours' dtype");
    }
    TORCH_CHECK(width >= 0 && height >= 0 && tile_size >= 1, "bad image/tile size");
    TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) == C, "isect_offsets must be [C, th, tw]");
    TORCH_CHECK(offsets.scalar_type() == at::kInt && flat.scalar_type() == at::kInt,
                "isect_offsets and flatten_ids must be int32");
    TORCH_CHECK(offsets.is_contiguous() && flat.is_contiguous() && flat.dim() == 1 &&
                    offsets.device().is_cpu() && flat.device().is_cpu(),
                "isect_offsets/flatten_ids: contiguous CPU tensors");
    TORCH_CHECK(offsets.size(1) * tile_size >= height && offsets.size(2) * tile_size >= width,
                "the tile grid does not cover the image");
    TORCH_CHECK(tile_size <= 1024, "tile_size too large");
    // Index sanity (cheap, O(tiles + n_isects)); bad indices would read out of bounds.
    const int64_t M = flat.numel(), nt = offsets.numel();
    TORCH_CHECK(M < (int64_t)std::numeric_limits<int32_t>::max(), "too many intersections");
    const int32_t *o = offsets.data_ptr<int32_t>();
    int64_t prev = 0;
    for (int64_t i = 0; i < nt; ++i) {
        TORCH_CHECK(o[i] >= prev && o[i] <= M,
                    "isect_offsets must be non-decreasing and within [0, n_isects]");
        prev = o[i];
    }
    const int32_t *f = flat.data_ptr<int32_t>();
    const int64_t CN = C * N;
    int64_t bad = 0;
    for (int64_t i = 0; i < M; ++i) bad += (f[i] < 0) | (f[i] >= CN);
    TORCH_CHECK(bad == 0, "flatten_ids out of range [0, C*N)");
}

Geom make_geom(const Tensor &means2d, int64_t width, int64_t height, int64_t tile_size,
               const Tensor &offsets, const Tensor &flat) {
    return Geom{means2d.size(0), means2d.size(1), height,         width,
                tile_size,       offsets.size(1), offsets.size(2), flat.numel()};
}

template <typename S>
void dispatch_forward(const Geom &G, int D, const Tensor &means2d, const Tensor &conics,
                      const Tensor &colors, const Tensor &opacities, const S *bg,
                      const Tensor &offsets, const Tensor &flat, Tensor &oc, Tensor &oa,
                      Tensor &ot, Tensor &ol) {
    const std::vector<GPar<S>> par =
        all_params<S>(G, means2d.data_ptr<S>(), conics.data_ptr<S>(), opacities.data_ptr<S>());
#define PEPE_FWD(DC, PLANAR)                                                                 \
    forward_impl<S, DC, PLANAR>(G, D, par.data(), colors.data_ptr<S>(), bg,                 \
                                offsets.data_ptr<int32_t>(), flat.data_ptr<int32_t>(),      \
                                oc.data_ptr<S>(), oa.data_ptr<S>(), ot.data_ptr<S>(),       \
                                ol.data_ptr<int32_t>())
    if (D <= kPlanarMaxD) {
        PEPE_FWD(0, true);
    } else if (std::is_same<S, float>::value && D == 32) {
        PEPE_FWD(32, false);
    } else {
        PEPE_FWD(0, false);
    }
#undef PEPE_FWD
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rasterize_fwd(
    const Tensor &means2d, const Tensor &conics, const Tensor &colors, const Tensor &opacities,
    const c10::optional<Tensor> &backgrounds, int64_t width, int64_t height, int64_t tile_size,
    const Tensor &isect_offsets, const Tensor &flatten_ids) {
    check_inputs(means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                 isect_offsets, flatten_ids);
    const Geom G = make_geom(means2d, width, height, tile_size, isect_offsets, flatten_ids);
    const int D = (int)colors.size(2);
    const auto opt = means2d.options();
    Tensor oc = at::empty({G.C, height, width, D}, opt);
    Tensor oa = at::empty({G.C, height, width, 1}, opt);
    Tensor ot = at::empty({G.C, height, width}, opt);
    Tensor ol = at::empty({G.C, height, width}, opt.dtype(at::kInt));
    if (means2d.scalar_type() == at::kFloat) {
        const float *bg = backgrounds.has_value() ? backgrounds->data_ptr<float>() : nullptr;
        dispatch_forward<float>(G, D, means2d, conics, colors, opacities, bg, isect_offsets,
                                flatten_ids, oc, oa, ot, ol);
    } else {
        const double *bg = backgrounds.has_value() ? backgrounds->data_ptr<double>() : nullptr;
        dispatch_forward<double>(G, D, means2d, conics, colors, opacities, bg, isect_offsets,
                                 flatten_ids, oc, oa, ot, ol);
    }
    return std::make_tuple(oc, oa, ot, ol);
}

template <typename S>
void backward_typed(const Geom &G, int D, bool absgrad, const Tensor &means2d,
                    const Tensor &conics, const Tensor &colors, const Tensor &opacities,
                    const c10::optional<Tensor> &backgrounds, const Tensor &offsets,
                    const Tensor &flat, const Tensor &t_final, const Tensor &last_ids,
                    const Tensor &v_c, const Tensor &v_a, Tensor &g_means, Tensor &g_conics,
                    Tensor &g_colors, Tensor &g_opac, Tensor &g_abs, Tensor &g_bg) {
    const int64_t CN = G.C * G.N, M = G.M;
    const int R = 6 + D + (absgrad ? 2 : 0);
    const S *bg = backgrounds.has_value() ? backgrounds->data_ptr<S>() : nullptr;

    // Counting sort of the intersections by Gaussian (stable: intersection order kept).
    const int32_t *f = flat.data_ptr<int32_t>();
    std::vector<int64_t> start(CN + 1, 0), slot(std::max<int64_t>(M, 1));
    for (int64_t i = 0; i < M; ++i) ++start[f[i] + 1];
    for (int64_t g = 0; g < CN; ++g) start[g + 1] += start[g];
    {
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < M; ++i) slot[i] = fill[f[i]]++;
    }

    Tensor rows_t = at::empty({std::max<int64_t>(M, 1), R}, means2d.options());
    S *rows = rows_t.data_ptr<S>();
    if (M > 0) {
        const std::vector<GPar<S>> par = all_params<S>(G, means2d.data_ptr<S>(),
                                                       conics.data_ptr<S>(), opacities.data_ptr<S>());
#define PEPE_BWD(DC, PLANAR)                                                                   \
    backward_tiles<S, DC, PLANAR>(G, D, R, absgrad, par.data(), colors.data_ptr<S>(), bg,     \
                                  offsets.data_ptr<int32_t>(), f, t_final.data_ptr<S>(),      \
                                  last_ids.data_ptr<int32_t>(), v_c.data_ptr<S>(),            \
                                  v_a.data_ptr<S>(), slot.data(), rows)
        if (D <= kPlanarMaxD) {
            PEPE_BWD(0, true);
        } else if (std::is_same<S, float>::value && D == 32) {
            PEPE_BWD(32, false);
        } else {
            PEPE_BWD(0, false);
        }
#undef PEPE_BWD
    }

    // Per-Gaussian reduction in intersection order, in double.
    S *gm = g_means.data_ptr<S>(), *gc = g_conics.data_ptr<S>(), *gcol = g_colors.data_ptr<S>();
    S *go = g_opac.data_ptr<S>();
    S *ga = absgrad ? g_abs.data_ptr<S>() : nullptr;
    at::parallel_for(0, CN, std::max<int64_t>(256, 100000 / (R * (M / std::max<int64_t>(CN, 1) + 1))),
                     [&](int64_t g0, int64_t g1) {
        std::vector<double> sum(R);
        for (int64_t g = g0; g < g1; ++g) {
            std::fill(sum.begin(), sum.end(), 0.0);
            for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                const S *row = rows + j * R;
                for (int k = 0; k < R; ++k) sum[k] += (double)row[k];
            }
            gm[2 * g] = (S)sum[0];
            gm[2 * g + 1] = (S)sum[1];
            gc[3 * g] = (S)sum[2];
            gc[3 * g + 1] = (S)sum[3];
            gc[3 * g + 2] = (S)sum[4];
            go[g] = (S)sum[5];
            for (int k = 0; k < D; ++k) gcol[g * D + k] = (S)sum[6 + k];
            if (ga) {
                ga[2 * g] = (S)sum[6 + D];
                ga[2 * g + 1] = (S)sum[7 + D];
            }
        }
    });

    // d/d background = sum over pixels of T_final * v_render_colors.
    if (bg) {
        const S *tf = t_final.data_ptr<S>();
        const S *vc = v_c.data_ptr<S>();
        S *gb = g_bg.data_ptr<S>();
        const int64_t P = G.H * G.W;
        at::parallel_for(0, G.C, std::max<int64_t>(1, 100000 / (P * D + 1)), [&](int64_t c0, int64_t c1) {
            std::vector<double> sum(D);
            for (int64_t c = c0; c < c1; ++c) {
                std::fill(sum.begin(), sum.end(), 0.0);
                for (int64_t p = 0; p < P; ++p) {
                    const double t = tf[c * P + p];
                    const S *v = vc + (c * P + p) * D;
                    for (int k = 0; k < D; ++k) sum[k] += t * (double)v[k];
                }
                for (int k = 0; k < D; ++k) gb[c * D + k] = (S)sum[k];
            }
        });
    }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rasterize_bwd(
    const Tensor &means2d, const Tensor &conics, const Tensor &colors, const Tensor &opacities,
    const c10::optional<Tensor> &backgrounds, int64_t width, int64_t height, int64_t tile_size,
    const Tensor &isect_offsets, const Tensor &flatten_ids, const Tensor &t_final,
    const Tensor &last_ids, const Tensor &v_render_colors, const Tensor &v_render_alphas,
    bool absgrad) {
    check_inputs(means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                 isect_offsets, flatten_ids);
    const Geom G = make_geom(means2d, width, height, tile_size, isect_offsets, flatten_ids);
    const int D = (int)colors.size(2);
    const auto st = means2d.scalar_type();
    TORCH_CHECK(t_final.sizes() == at::IntArrayRef({G.C, height, width}) &&
                    t_final.scalar_type() == st && t_final.is_contiguous(),
                "t_final must be [C, H, W]");
    TORCH_CHECK(last_ids.sizes() == at::IntArrayRef({G.C, height, width}) &&
                    last_ids.scalar_type() == at::kInt && last_ids.is_contiguous(),
                "last_ids must be int32 [C, H, W]");
    TORCH_CHECK(v_render_colors.sizes() == at::IntArrayRef({G.C, height, width, D}) &&
                    v_render_colors.scalar_type() == st && v_render_colors.is_contiguous(),
                "v_render_colors must be [C, H, W, D]");
    TORCH_CHECK(v_render_alphas.numel() == G.C * height * width &&
                    v_render_alphas.scalar_type() == st && v_render_alphas.is_contiguous(),
                "v_render_alphas must be [C, H, W, 1]");
    const auto opt = means2d.options();
    Tensor g_means = at::empty({G.C, G.N, 2}, opt);
    Tensor g_conics = at::empty({G.C, G.N, 3}, opt);
    Tensor g_colors = at::empty({G.C, G.N, D}, opt);
    Tensor g_opac = at::empty({G.C, G.N}, opt);
    Tensor g_abs = absgrad ? at::empty({G.C, G.N, 2}, opt) : at::empty({0}, opt);
    Tensor g_bg = backgrounds.has_value() ? at::empty({G.C, D}, opt) : at::empty({0}, opt);
    if (st == at::kFloat) {
        backward_typed<float>(G, D, absgrad, means2d, conics, colors, opacities, backgrounds,
                              isect_offsets, flatten_ids, t_final, last_ids, v_render_colors,
                              v_render_alphas, g_means, g_conics, g_colors, g_opac, g_abs, g_bg);
    } else {
        backward_typed<double>(G, D, absgrad, means2d, conics, colors, opacities, backgrounds,
                               isect_offsets, flatten_ids, t_final, last_ids, v_render_colors,
                               v_render_alphas, g_means, g_conics, g_colors, g_opac, g_abs, g_bg);
    }
    return std::make_tuple(g_means, g_conics, g_colors, g_opac, g_abs, g_bg);
}

}  // namespace

TORCH_LIBRARY(pepeseg3d_cpu, m) {
    m.def(
        "rasterize_fwd(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, "
        "Tensor? backgrounds, int width, int height, int tile_size, Tensor isect_offsets, "
        "Tensor flatten_ids) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def(
        "rasterize_bwd(Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, "
        "Tensor? backgrounds, int width, int height, int tile_size, Tensor isect_offsets, "
        "Tensor flatten_ids, Tensor t_final, Tensor last_ids, Tensor v_render_colors, "
        "Tensor v_render_alphas, bool absgrad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(pepeseg3d_cpu, CPU, m) {
    m.impl("rasterize_fwd", &rasterize_fwd);
    m.impl("rasterize_bwd", &rasterize_bwd);
}
