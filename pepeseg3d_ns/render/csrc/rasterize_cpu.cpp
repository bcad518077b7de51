// CPU alpha compositing of projected 2D Gaussians (gsplat 1.4.0 `rasterize_to_pixels`
// semantics, non-packed), with a hand-written backward pass.
//
// Forward: every (camera, tile) is one task; a task walks its tile's depth-sorted list
// once, Gaussian by Gaussian, and only visits the pixels of the tile that the Gaussian can
// reach (its alpha >= 1/255 footprint, computed conservatively from the conic), keeping
// per-pixel state (T, accumulated colour, last index, done flag) in a small tile-local
// buffer.  Per pixel the Gaussians are still taken strictly in list order, so the result is
// the same as gsplat's pixel-major loop.
//
// Backward: same tiling, walking the list back to front from the tile's largest "last
// index"; each pixel recovers its transmittance by dividing T_final by (1 - alpha).  The
// gradient of one (tile, Gaussian) pair, summed over the tile's pixels, is written to its own
// row of an [n_isects, R] buffer (no races); the rows are then summed per Gaussian in
// intersection order (in double).  Result: bitwise deterministic, independent of the
// number of threads.
//
// Built JIT by pepeseg3d_ns/render/cpu_backend.py (g++ -O3 -fopenmp, no CUDA).  Registered
// as torch ops `torch.ops.pepeseg3d_cpu.*` (no pybind11: keeps the compile short).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
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
// Geometry shared by forward and backward.

struct Geom {
    int64_t C, N, H, W, ts, TH, TW, M;
};

struct Box {
    int r0, r1, c0, c1;  // tile-local pixel rows/cols, half-open
};

// Pixels of the tile (origin x0, y0; pw x ph pixels) where Gaussian (mx, my, conic a b c,
// opacity op >= 1/255) may reach alpha >= 1/255.  Conservative: every pixel that the exact
// per-pixel test would accept lies in the box.  `s_skip` is a per-pixel early reject on sigma
// (sigma > s_skip implies alpha < 1/255 for the very same float sigma).  Returns false when
// no pixel of the tile can be reached.
template <typename S>
inline bool footprint(S mx, S my, S a, S b, S c, S op, int x0, int y0, int pw, int ph, S &s_skip,
                      Box &box) {
    const double s = std::log(255.0 * (double)op);  // alpha >= 1/255  <=>  sigma <= s
    const double da = a, db = b, dc = c;
    const double det = da * dc - db * db;
    box = Box{0, ph, 0, pw};
    if (!(da > 0.0) || !(det > 0.0) || !std::isfinite(s) || !std::isfinite(det) ||
        !std::isfinite((double)mx) || !std::isfinite((double)my)) {
        s_skip = std::numeric_limits<S>::infinity();  // not positive definite: whole tile, no skip
        return true;
    }
    s_skip = (S)(s + 1e-3);
    // float rounding of sigma grows with the conic's condition (a*c/det); widen accordingly.
    const double kappa = da * dc / det;
    const double sb = (std::max(s, 0.0) + 1e-3) * (1.001 + 4e-6 * kappa);
    const double rx = std::sqrt(2.0 * sb * dc / det);
    const double ry = std::sqrt(2.0 * sb * da / det);
    // pixel column j (centre j + 0.5) can be reached iff |j + 0.5 - mx| <= rx
    const double lo_x = std::ceil((double)mx - rx - 0.5) - x0;
    const double hi_x = std::floor((double)mx + rx - 0.5) - x0 + 1.0;
    const double lo_y = std::ceil((double)my - ry - 0.5) - y0;
    const double hi_y = std::floor((double)my + ry - 0.5) - y0 + 1.0;
    box.c0 = (int)std::max(0.0, std::min((double)pw, lo_x));
    box.c1 = (int)std::max(0.0, std::min((double)pw, hi_x));
    box.r0 = (int)std::max(0.0, std::min((double)ph, lo_y));
    box.r1 = (int)std::max(0.0, std::min((double)ph, hi_y));
    if (!std::isfinite(rx) || !std::isfinite(ry)) box = Box{0, ph, 0, pw};
    return box.c0 < box.c1 && box.r0 < box.r1;
}

// Same float expression (and evaluation order) as gsplat.
template <typename S>
inline S sigma_of(S a, S b, S c, S dx, S dy) {
    return S(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy;
}

inline void tile_range(const int32_t *offsets, const Geom &g, int64_t task, int64_t &rs,
                       int64_t &re) {
    rs = offsets[task];
    re = (task + 1 < g.C * g.TH * g.TW) ? (int64_t)offsets[task + 1] : g.M;
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename S, int DC>
void forward_impl(const Geom &G, int Dr, const S *means, const S *conics, const S *colors,
                  const S *opac, const S *bg, const int32_t *offsets, const int32_t *flat,
                  S *out_c, S *out_a, S *out_t, int32_t *out_last) {
    const int D = DC > 0 ? DC : Dr;
    const int64_t ntask = G.C * G.TH * G.TW;
    const int ts = (int)G.ts;
    const int npix = ts * ts;
    const int nthreads = num_threads(ntask, G.M * 16 + G.C * G.H * G.W);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        std::vector<S> T(npix), acc((size_t)npix * D);
        std::vector<int32_t> last(npix);
        std::vector<unsigned char> done(npix);
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
            std::fill(T.begin(), T.begin() + np, S(1));
            std::fill(acc.begin(), acc.begin() + (size_t)np * D, S(0));
            std::fill(last.begin(), last.begin() + np, -1);
            std::fill(done.begin(), done.begin() + np, 0);
            int active = np;

            int64_t rs, re;
            tile_range(offsets, G, task, rs, re);
            for (int64_t idx = rs; idx < re && active > 0; ++idx) {
                const int64_t gid = flat[idx];
                const S op = opac[gid];
                // alpha = min(0.999, op * exp(-sigma)) <= op whenever sigma >= 0
                if (!(op >= Consts<S>::kAlphaMin)) continue;
                const S mx = means[2 * gid], my = means[2 * gid + 1];
                const S a = conics[3 * gid], b = conics[3 * gid + 1], c = conics[3 * gid + 2];
                S s_skip;
                Box bx;
                if (!footprint<S>(mx, my, a, b, c, op, x0, y0, pw, ph, s_skip, bx)) continue;
                const S *col = colors + gid * D;
                for (int r = bx.r0; r < bx.r1; ++r) {
                    const S dy = my - ((S)(y0 + r) + S(0.5));
                    for (int q = bx.c0; q < bx.c1; ++q) {
                        const int p = r * pw + q;
                        if (done[p]) continue;
                        const S dx = mx - ((S)(x0 + q) + S(0.5));
                        const S sigma = sigma_of(a, b, c, dx, dy);
                        if (sigma > s_skip || sigma < S(0)) continue;
                        const S alpha = std::min(Consts<S>::kAlphaMax, op * std::exp(-sigma));
                        if (alpha < Consts<S>::kAlphaMin) continue;
                        const S t = T[p];
                        const S next_t = t * (S(1) - alpha);
                        if (next_t <= kTMin) {  // saturated; this Gaussian is not included
                            done[p] = 1;
                            --active;
                            continue;
                        }
                        const S vis = alpha * t;
                        S *ap = acc.data() + (size_t)p * D;
                        for (int k = 0; k < D; ++k) ap[k] += col[k] * vis;
                        last[p] = (int32_t)idx;
                        T[p] = next_t;
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
                    const S *ap = acc.data() + (size_t)p * D;
                    if (bgc) {
                        for (int k = 0; k < D; ++k) o[k] = ap[k] + t * bgc[k];
                    } else {
                        for (int k = 0; k < D; ++k) o[k] = ap[k];
                    }
                    out_a[pix] = S(1) - t;
                    out_t[pix] = t;
                    out_last[pix] = last[p];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backward

// The per-channel work of one (pixel, Gaussian) pair, back to front:
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

template <typename S, int DC>
void backward_tiles(const Geom &G, int Dr, int R, bool absgrad, const S *means, const S *conics,
                    const S *colors, const S *opac, const S *bg, const int32_t *offsets,
                    const int32_t *flat, const S *t_final, const int32_t *last_ids,
                    const S *v_out_c, const S *v_out_a, const int64_t *slot, S *rows) {
    const int D = DC > 0 ? DC : Dr;
    const int64_t ntask = G.C * G.TH * G.TW;
    const int ts = (int)G.ts;
    const int npix = ts * ts;
    const int nthreads = num_threads(ntask, G.M * 16 + G.C * G.H * G.W);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        std::vector<S> T(npix), Tf(npix), va(npix), bgdot(npix), buf((size_t)npix * D);
        std::vector<int32_t> bin(npix);
        std::vector<const S *> vcp(npix);
        std::vector<S> vrgb(D);
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
            for (int r = 0; r < ph; ++r) {
                for (int q = 0; q < pw; ++q) {
                    const int p = r * pw + q;
                    const int64_t pix = (cam * G.H + y0 + r) * G.W + x0 + q;
                    T[p] = Tf[p] = t_final[pix];
                    va[p] = v_out_a[pix];
                    bin[p] = last_ids[pix];
                    max_bin = std::max<int64_t>(max_bin, bin[p]);
                    vcp[p] = v_out_c + pix * D;
                    S dot = S(0);
                    if (bgc)
                        for (int k = 0; k < D; ++k) dot += bgc[k] * vcp[p][k];
                    bgdot[p] = dot;
                }
            }
            std::fill(buf.begin(), buf.begin() + (size_t)np * D, S(0));

            // rows of Gaussians behind every pixel's last contributor get zero gradient
            const int64_t start = std::max<int64_t>(rs - 1, std::min<int64_t>(re - 1, max_bin));
            for (int64_t idx = re - 1; idx > start; --idx)
                std::fill(rows + slot[idx] * R, rows + (slot[idx] + 1) * R, S(0));

            for (int64_t idx = start; idx >= rs; --idx) {
                S *row = rows + slot[idx] * R;
                const int64_t gid = flat[idx];
                const S op = opac[gid];
                const S mx = means[2 * gid], my = means[2 * gid + 1];
                const S a = conics[3 * gid], b = conics[3 * gid + 1], c = conics[3 * gid + 2];
                S s_skip;
                Box bx;
                if (!(op >= Consts<S>::kAlphaMin) ||
                    !footprint<S>(mx, my, a, b, c, op, x0, y0, pw, ph, s_skip, bx)) {
                    std::fill(row, row + R, S(0));
                    continue;
                }
                const S *__restrict__ col = colors + gid * D;
                S vx = 0, vy = 0, vca = 0, vcb = 0, vcc = 0, vop = 0, ax = 0, ay = 0;
                std::fill(vrgb.begin(), vrgb.end(), S(0));
                S *__restrict__ vr = vrgb.data();
                for (int r = bx.r0; r < bx.r1; ++r) {
                    const S dy = my - ((S)(y0 + r) + S(0.5));
                    for (int q = bx.c0; q < bx.c1; ++q) {
                        const int p = r * pw + q;
                        if (idx > bin[p]) continue;
                        const S dx = mx - ((S)(x0 + q) + S(0.5));
                        const S sigma = sigma_of(a, b, c, dx, dy);
                        if (sigma > s_skip || sigma < S(0)) continue;
                        const S vis = std::exp(-sigma);
                        const S alpha = std::min(Consts<S>::kAlphaMax, op * vis);
                        if (alpha < Consts<S>::kAlphaMin) continue;

                        const S ra = S(1) / (S(1) - alpha);
                        const S t = T[p] * ra;  // transmittance in front of this Gaussian
                        T[p] = t;
                        const S fac = alpha * t;
                        const S *__restrict__ vc = vcp[p];
                        S *__restrict__ bp = buf.data() + (size_t)p * D;
                        S v_alpha = channel_pass<S, DC>(D, col, vc, bp, vr, t, ra, fac);
                        v_alpha += Tf[p] * ra * va[p];
                        if (bgc) v_alpha += -Tf[p] * ra * bgdot[p];

                        if (op * vis <= Consts<S>::kAlphaMax) {  // no gradient through the clamp
                            const S v_sigma = -op * vis * v_alpha;
                            vca += S(0.5) * v_sigma * dx * dx;
                            vcb += v_sigma * dx * dy;
                            vcc += S(0.5) * v_sigma * dy * dy;
                            const S gx = v_sigma * (a * dx + b * dy);
                            const S gy = v_sigma * (b * dx + c * dy);
                            vx += gx;
                            vy += gy;
                            if (absgrad) {
                                ax += std::abs(gx);
                                ay += std::abs(gy);
                            }
                            vop += vis * v_alpha;
                        }
                    }
                }
                row[0] = vx;
                row[1] = vy;
                row[2] = vca;
                row[3] = vcb;
                row[4] = vcc;
                row[5] = vop;
                for (int k = 0; k < D; ++k) row[6 + k] = vr[k];
                if (absgrad) {
                    row[6 + D] = ax;
                    row[7 + D] = ay;
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
#define PEPE_FWD(DC)                                                                          \
    forward_impl<S, DC>(G, D, means2d.data_ptr<S>(), conics.data_ptr<S>(), colors.data_ptr<S>(), \
                        opacities.data_ptr<S>(), bg, offsets.data_ptr<int32_t>(),             \
                        flat.data_ptr<int32_t>(), oc.data_ptr<S>(), oa.data_ptr<S>(),         \
                        ot.data_ptr<S>(), ol.data_ptr<int32_t>())
    if (std::is_same<S, float>::value && D == 3) {
        PEPE_FWD(3);
    } else {
        PEPE_FWD(0);
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
#define PEPE_BWD(DC)                                                                           \
    backward_tiles<S, DC>(G, D, R, absgrad, means2d.data_ptr<S>(), conics.data_ptr<S>(),      \
                          colors.data_ptr<S>(), opacities.data_ptr<S>(), bg,                  \
                          offsets.data_ptr<int32_t>(), f, t_final.data_ptr<S>(),              \
                          last_ids.data_ptr<int32_t>(), v_c.data_ptr<S>(), v_a.data_ptr<S>(), \
                          slot.data(), rows)
        if (std::is_same<S, float>::value && D == 3) {
            PEPE_BWD(3);
        } else {
            PEPE_BWD(0);
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
