// CPU masked attention. Per sample s, over the query heads it keeps (head_keep; all r heads of
// every kept group without it) and the K/V heads of the kept groups that keep one at least (HeadPlan):
//   1. copy those heads' weight blocks into one block ordered [q of every kept head | k of every
//      computed group | v of every computed group] (memcpy per block: a head is a contiguous
//      tile, and ATen's index_select measured far slower than the copy itself);
//   2. one GEMM (bias fused by addmm) projects x onto it: qkv (B*T, (H + 2c)*hd). With that row
//      order q, k and v are plain strided views (B, heads, T, hd) of qkv, never copied;
//   3. one parallel pass applies the per-head RMSNorm (Qwen3) and RoPE in place on q and k;
//   4. attention on those views (enable_gqa: no repeat of K/V), one call per run of groups that
//      keep as many heads (one call without head_keep); its output is laid out (B, T, heads, hd),
//      so it is the left operand of the last GEMM as is;
//   5. one GEMM through the kept heads' blocks of W_o^T, written straight into out[s].
// A pruned head costs nothing: no projection row, no QK^T, softmax or PV, no W_o row; a group
// keeping no head costs no K/V projection either.
// fp16/bf16 are computed in fp32 on CPUs without native half-precision GEMMs (compute_dtype.h).
// unit_scale (S, G), aligned with keep_idx, multiplies the kept groups' attention outputs before step 5.
// Backward, per sample: the same gathers; qkv and its normed, rotated copy recomputed (one GEMM
// and one pass); attention recomputed with its log-sum-exp and differentiated by ATen's CPU
// flash-attention kernels (GQA without copies, run by run); dO = dY W_o (one GEMM); RoPE and q/k
// norm differentiated in place in one pass; dX = dQKV W (one GEMM); the kept blocks' weight
// gradients (two GEMMs) added into float accumulators block by block. Pruned blocks (of pruned
// groups and pruned heads) are never read and keep a zero gradient.
// Positions and masks: position_ids (B, T) choose each token's cos/sin row in the norm/RoPE pass
// (and its transpose). The default (no attention_mask, no window) is ATen's causal attention
// as is. A key padding mask is an additive (B, 1, 1, T) mask (0 / -inf) on top of is_causal, so
// ATen still skips the key blocks above the diagonal. A window below T runs the attention in
// query chunks of at most kWindowChunk rows: the chunk [t0, t1) reads only the keys
// [t0 - window + 1, t1) it can see, with an explicit (causal, window, padding) additive mask, so a
// row never loops over more than window + chunk keys; forward and backward use the same chunks.
// A query row that sees no key gets zeros and passes no gradient (ATen's flash kernels leave such
// a row at 0 with a log-sum-exp of 0).
// Batch invariance: samples run one after another with the same calls whatever S is.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gather.h"
#include "gemm.h"
#include "parallel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace bpp {
namespace {

// What one sample computes, in head blocks (hd rows of w_qkv, hd elements of b_qkv, hd rows of
// w_o_t): the query heads it keeps of its kept groups, and the K/V heads of the kept groups that
// keep at least one query head (a group with none is skipped whole). Groups are ordered by how
// many query heads they keep, most first (keep_idx order among equals), so the groups keeping
// the same number form a run: one GQA attention call each (GQA needs as many query heads per
// KV head throughout a call). Without head_keep every kept group keeps its r heads: one run, in
// keep_idx order, the same rows, GEMMs and calls as a layout by whole groups.
struct HeadPlan {
  struct Run {
    int64_t heads_per_group, first_group, groups, first_head;
  };
  std::vector<int32_t> q_blocks, k_blocks, v_blocks;  // w_qkv blocks (group * (r+2) + row block)
  std::vector<int32_t> o_blocks;                      // w_o_t blocks of the query heads (group * r + head)
  std::vector<int32_t> head_slot;                     // per query head: its group's slot in keep_idx
  std::vector<int32_t> group_slot;                    // per computed group: its slot in keep_idx
  std::vector<Run> runs;
  int64_t heads() const { return static_cast<int64_t>(q_blocks.size()); }
  int64_t groups() const { return static_cast<int64_t>(k_blocks.size()); }
};

// kept: the c kept groups of the sample; head_keep: its (G, r) row of head_keep, or null.
HeadPlan plan_heads(const int32_t* kept, int64_t c, int64_t r, const bool* head_keep) {
  std::vector<std::pair<int64_t, int32_t>> order;  // (kept query heads, slot) of the groups to compute
  for (int64_t j = 0; j < c; ++j) {
    const int64_t g = kept[j];
    const int64_t n = head_keep == nullptr ? r : std::count(head_keep + g * r, head_keep + (g + 1) * r, true);
    if (n > 0) order.emplace_back(n, static_cast<int32_t>(j));
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  HeadPlan p;
  for (const auto& [n, j] : order) {
    const int32_t g = kept[j];
    if (p.runs.empty() || p.runs.back().heads_per_group != n)
      p.runs.push_back({n, p.groups(), 0, p.heads()});
    ++p.runs.back().groups;
    for (int64_t h = 0; h < r; ++h) {
      if (head_keep != nullptr && !head_keep[g * r + h]) continue;
      p.q_blocks.push_back(static_cast<int32_t>(g * (r + 2) + h));
      p.o_blocks.push_back(static_cast<int32_t>(g * r + h));
      p.head_slot.push_back(j);
    }
    p.k_blocks.push_back(static_cast<int32_t>(g * (r + 2) + r));
    p.v_blocks.push_back(static_cast<int32_t>(g * (r + 2) + r + 1));
    p.group_slot.push_back(j);
  }
  return p;
}

// The plan's rows of w_qkv (block = hd*d elements) or b_qkv (block = hd), in the order [q of every
// computed query head | k of every computed group | v of every computed group]: one memcpy per
// block (a head is a contiguous tile; ATen's index_select measured far slower than the copy).
at::Tensor gather_qkv(const at::Tensor& w, const HeadPlan& p, int64_t block) {
  const int64_t H = p.heads(), c = p.groups(), esz = w.element_size();
  auto out = at::empty({(H + 2 * c) * block}, w.options());
  const char* src = static_cast<const char*>(w.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  gather_rows(src, block, p.q_blocks.data(), H, block, dst, block, esz);
  gather_rows(src, block, p.k_blocks.data(), c, block, dst + H * block * esz, block, esz);
  gather_rows(src, block, p.v_blocks.data(), c, block, dst + (H + c) * block * esz, block, esz);
  return out;
}

// In place on each head row (hd contiguous elements) of q and k inside qkv (B*T, width):
// optional RMSNorm with float statistics (as the reference: normalise, round, then weight),
// then rotate-half RoPE, each result rounded once from float.
template <typename scalar_t>
void norm_rope_inplace(at::Tensor& qkv, int64_t T, int64_t q_heads, int64_t k_heads, int64_t hd,
                       const at::Tensor& cos, const at::Tensor& sin, const int64_t* pos,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       double eps) {
  const int64_t BT = qkv.size(0), width = qkv.size(1), half = hd / 2;
  scalar_t* base = qkv.mutable_data_ptr<scalar_t>();
  const scalar_t* cs = cos.const_data_ptr<scalar_t>();
  const scalar_t* sn = sin.const_data_ptr<scalar_t>();
  const scalar_t* qw = q_norm ? q_norm->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* kw = k_norm ? k_norm->const_data_ptr<scalar_t>() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, BT, grain_for((q_heads + k_heads) * hd), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hd);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t p = pos != nullptr ? pos[bt] : bt % T;  // the cos/sin row of token bt = b*T + t
      const scalar_t* ct = cs + p * hd;
      const scalar_t* st = sn + p * hd;
      for (int64_t h = 0; h < q_heads + k_heads; ++h) {
        scalar_t* row = base + bt * width + h * hd;  // k heads follow the q heads directly
        const scalar_t* w = h < q_heads ? qw : kw;
        if (w != nullptr) {
          float ss = 0.f;
          for (int64_t e = 0; e < hd; ++e) ss += static_cast<float>(row[e]) * static_cast<float>(row[e]);
          const float rstd = 1.f / std::sqrt(ss / static_cast<float>(hd) + feps);
          for (int64_t e = 0; e < hd; ++e)
            buf[e] = static_cast<float>(w[e]) * static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[e]) * rstd));
        } else {
          for (int64_t e = 0; e < hd; ++e) buf[e] = static_cast<float>(row[e]);
        }
        for (int64_t e = 0; e < half; ++e) {
          row[e] = static_cast<scalar_t>(buf[e] * static_cast<float>(ct[e]) - buf[e + half] * static_cast<float>(st[e]));
          row[e + half] = static_cast<scalar_t>(buf[e + half] * static_cast<float>(ct[e + half]) +
                                                buf[e] * static_cast<float>(st[e + half]));
        }
      }
    }
  });
}

// acc (float, (G, (r+2)*hd, elem_per_row)) += src (float, rows in gather_qkv's order): the
// transpose of gather_qkv, for the weight (block = hd*d) and bias (block = hd) gradients.
void scatter_add_qkv(at::Tensor& acc, const at::Tensor& src, const HeadPlan& p, int64_t block) {
  const int64_t H = p.heads(), c = p.groups();
  float* a = acc.mutable_data_ptr<float>();
  const auto flat = src.reshape(-1);
  scatter_add_rows(a, block, p.q_blocks.data(), H, block, flat, block);
  scatter_add_rows(a, block, p.k_blocks.data(), c, block, flat.narrow(0, H * block, c * block), block);
  scatter_add_rows(a, block, p.v_blocks.data(), c, block, flat.narrow(0, (H + c) * block, c * block), block);
}

// The transpose of norm_rope_inplace, in place on the q and k head rows of dqkv (B*T, width),
// which hold the gradients of the rotated heads on entry and those of the projections (before
// the norm) on exit. pre holds the projections themselves (read only when a norm is present).
// The norm weights' gradient contributions go to dqn_rows / dkn_rows (B*T, hd), one row per
// token, summed by the caller (so every entry has one writer and a fixed order).
template <typename scalar_t>
void norm_rope_backward_inplace(at::Tensor& dqkv, const at::Tensor& pre, int64_t T, int64_t q_heads, int64_t k_heads,
                                int64_t hd, const at::Tensor& cos, const at::Tensor& sin, const int64_t* pos,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                double eps, float* dqn_rows, float* dkn_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t BT = dqkv.size(0), width = dqkv.size(1), half = hd / 2;
  scalar_t* base = dqkv.mutable_data_ptr<scalar_t>();
  const scalar_t* pbase = pre.const_data_ptr<scalar_t>();
  const scalar_t* cs = cos.const_data_ptr<scalar_t>();
  const scalar_t* sn = sin.const_data_ptr<scalar_t>();
  const scalar_t* qw = q_norm ? q_norm->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* kw = k_norm ? k_norm->const_data_ptr<scalar_t>() : nullptr;
  const acc_t feps = static_cast<acc_t>(eps);
  at::parallel_for(0, BT, grain_for((q_heads + k_heads) * hd), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(hd);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t p = pos != nullptr ? pos[bt] : bt % T;
      const scalar_t* ct = cs + p * hd;
      const scalar_t* st = sn + p * hd;
      for (int64_t h = 0; h < q_heads + k_heads; ++h) {
        scalar_t* row = base + bt * width + h * hd;
        for (int64_t e = 0; e < half; ++e) {  // RoPE transposed
          const acc_t lo = static_cast<acc_t>(row[e]), hi = static_cast<acc_t>(row[e + half]);
          g[e] = lo * static_cast<acc_t>(ct[e]) + hi * static_cast<acc_t>(st[e + half]);
          g[e + half] = hi * static_cast<acc_t>(ct[e + half]) - lo * static_cast<acc_t>(st[e]);
        }
        const scalar_t* w = h < q_heads ? qw : kw;
        if (w == nullptr) {
          for (int64_t e = 0; e < hd; ++e) row[e] = static_cast<scalar_t>(g[e]);
          continue;
        }
        float* rows = h < q_heads ? dqn_rows : dkn_rows;  // null when the norm weight needs no gradient
        float* dw = rows != nullptr ? rows + bt * hd : nullptr;
        const scalar_t* p = pbase + bt * width + h * hd;
        acc_t ss = 0;
        for (int64_t e = 0; e < hd; ++e) ss += static_cast<acc_t>(p[e]) * static_cast<acc_t>(p[e]);
        const acc_t rstd = 1 / std::sqrt(ss / static_cast<acc_t>(hd) + feps);
        acc_t dot = 0;
        for (int64_t e = 0; e < hd; ++e) {
          const acc_t xhat = static_cast<acc_t>(p[e]) * rstd;
          if (dw != nullptr) dw[e] += static_cast<float>(g[e] * static_cast<acc_t>(static_cast<scalar_t>(xhat)));
          dot += g[e] * static_cast<acc_t>(w[e]) * xhat;
        }
        const acc_t mean = dot / static_cast<acc_t>(hd);
        for (int64_t e = 0; e < hd; ++e) {
          const acc_t xhat = static_cast<acc_t>(p[e]) * rstd;
          row[e] = static_cast<scalar_t>(rstd * (g[e] * static_cast<acc_t>(w[e]) - xhat * mean));
        }
      }
    }
  });
}

struct Shapes {
  int64_t S, B, T, d, hd, G, rows, r;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& w_o_t, const at::Tensor& cos,
                    const at::Tensor& sin, const at::Tensor& keep_idx, const at::Tensor& keep_count,
                    const std::optional<at::Tensor>& b_qkv, const std::optional<at::Tensor>& q_norm,
                    const std::optional<at::Tensor>& k_norm, const std::optional<at::Tensor>& unit_scale,
                    const std::optional<at::Tensor>& position_ids, const std::optional<at::Tensor>& attention_mask,
                    int64_t window, const std::optional<at::Tensor>& head_keep) {
  TORCH_CHECK(x.dim() == 4, "masked_attention: x must be (S, B, T, d), got ", x.sizes());
  const int64_t S = x.size(0), B = x.size(1), T = x.size(2), d = x.size(3);
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes(), "masked_attention: cos and sin must be (P, hd), got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(position_ids.has_value() || cos.size(0) >= T, "masked_attention: cos and sin need a row per position ",
              "0..T-1 (T=", T, ") without position_ids, got ", cos.size(0), " rows");
  TORCH_CHECK(!position_ids || (position_ids->dim() == 2 && position_ids->size(0) == B && position_ids->size(1) == T &&
                                (position_ids->scalar_type() == at::kLong || position_ids->scalar_type() == at::kInt)),
              "masked_attention: position_ids must be a (B=", B, ", T=", T, ") int64 or int32 tensor");
  TORCH_CHECK(!attention_mask || (attention_mask->dim() == 2 && attention_mask->size(0) == B &&
                                  attention_mask->size(1) == T && attention_mask->scalar_type() == at::kBool),
              "masked_attention: attention_mask must be a (B=", B, ", T=", T, ") bool tensor");
  TORCH_CHECK(window >= 0, "masked_attention: window must be positive (0: none), got ", window);
  const int64_t hd = cos.size(1);
  TORCH_CHECK(hd % 2 == 0, "masked_attention: head_dim ", hd, " must be even for rotate-half RoPE");
  TORCH_CHECK(w_qkv.dim() == 3 && w_qkv.size(2) == d && w_qkv.size(1) % hd == 0 && w_qkv.size(1) / hd >= 3,
              "masked_attention: w_qkv must be (G, (r+2)*hd, d=", d, ") with hd=", hd, ", got ", w_qkv.sizes());
  const int64_t G = w_qkv.size(0), rows = w_qkv.size(1), r = rows / hd - 2;
  TORCH_CHECK(w_o_t.dim() == 3 && w_o_t.size(0) == G && w_o_t.size(1) == r * hd && w_o_t.size(2) == d,
              "masked_attention: w_o_t must be (G=", G, ", r*hd=", r * hd, ", d=", d, "), got ", w_o_t.sizes());
  TORCH_CHECK(!b_qkv || (b_qkv->dim() == 2 && b_qkv->size(0) == G && b_qkv->size(1) == rows),
              "masked_attention: b_qkv must be (G=", G, ", (r+2)*hd=", rows, ")");
  TORCH_CHECK(!q_norm || (q_norm->dim() == 1 && q_norm->size(0) == hd), "masked_attention: q_norm must be (hd=", hd,
              ",)");
  TORCH_CHECK(!k_norm || (k_norm->dim() == 1 && k_norm->size(0) == hd), "masked_attention: k_norm must be (hd=", hd,
              ",)");
  const auto store = x.scalar_type();
  TORCH_CHECK(w_qkv.scalar_type() == store && w_o_t.scalar_type() == store && (!b_qkv || b_qkv->scalar_type() == store),
              "masked_attention: x, w_qkv, w_o_t and b_qkv must share a dtype, got ", store, ", ", w_qkv.scalar_type(),
              ", ", w_o_t.scalar_type());
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_attention: keep_idx and keep_count must be int32 (use mask_to_index), got ",
              keep_idx.scalar_type(), " and ", keep_count.scalar_type());
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.size(0) == S && keep_idx.size(1) == G && keep_count.dim() == 1 &&
                  keep_count.size(0) == S,
              "masked_attention: keep_idx must be (S=", S, ", G=", G, ") and keep_count (S,), got ", keep_idx.sizes(),
              " and ", keep_count.sizes());
  TORCH_CHECK(!unit_scale || (unit_scale->dim() == 2 && unit_scale->size(0) == S && unit_scale->size(1) == G &&
                              at::isFloatingType(unit_scale->scalar_type())),
              "masked_attention: unit_scale must be a floating (S=", S, ", G=", G, ") tensor aligned with keep_idx");
  TORCH_CHECK(!head_keep || (head_keep->dim() == 3 && head_keep->size(0) == S && head_keep->size(1) == G &&
                             head_keep->size(2) == r && head_keep->scalar_type() == at::kBool),
              "masked_attention: head_keep must be a (S=", S, ", G=", G, ", r=", r, ") bool tensor");
  TORCH_CHECK(x.device().is_cpu() && w_qkv.device().is_cpu() && w_o_t.device().is_cpu() &&
                  (!position_ids || position_ids->device().is_cpu()) &&
                  (!attention_mask || attention_mask->device().is_cpu()) && (!head_keep || head_keep->device().is_cpu()),
              "masked_attention: the cpp backend takes CPU tensors only");
  return {S, B, T, d, hd, G, rows, r};
}

int64_t kept_groups(const int32_t* counts, const int32_t* indices, int64_t s, int64_t G) {
  const int64_t c = counts[s];
  TORCH_CHECK(c >= 0 && c <= G, "masked_attention: keep_count[", s, "] = ", c, " is outside [0, G=", G, "]");
  const int32_t* kept = indices + s * G;
  for (int64_t j = 0; j < c; ++j)
    TORCH_CHECK(kept[j] >= 0 && kept[j] < G, "masked_attention: keep_idx[", s, ", ", j, "] = ", kept[j],
                " is outside [0, G=", G, ")");
  return c;
}

// position_ids as contiguous int64 (B, T), each checked against the P rows of cos/sin (reading a
// row past the table would read out of bounds); undefined when absent.
at::Tensor checked_positions(const std::optional<at::Tensor>& position_ids, int64_t P) {
  if (!position_ids) return at::Tensor();
  auto pos = position_ids->to(at::kLong).contiguous();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const int64_t T = pos.size(1);
  for (int64_t i = 0; i < pos.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < P, "masked_attention: position_ids[", i / T, ", ", i % T, "] = ", p[i],
                " is outside [0, ", P, ") (cos/sin have ", P, " rows)");
  return pos;
}

// Which keys each query sees beyond causality: key_bias (B, T) in the compute dtype, 0 for a
// real key and -inf for padding (undefined: no padding), and window (0: none; a window of T or
// more is none, as it hides nothing).
struct Masking {
  at::Tensor key_bias;
  int64_t window = 0;
  bool plain() const { return !key_bias.defined() && window == 0; }
};

Masking make_masking(const std::optional<at::Tensor>& attention_mask, int64_t window, int64_t T,
                     at::ScalarType compute) {
  Masking mk;
  mk.window = window >= T ? 0 : window;
  if (attention_mask) {
    mk.key_bias = at::zeros(attention_mask->sizes(), attention_mask->options().dtype(compute))
                      .masked_fill_(attention_mask->logical_not(), -std::numeric_limits<double>::infinity());
  }
  return mk;
}

constexpr int64_t kWindowChunk = 128;  // query rows per call of the windowed attention

// The query chunks of the windowed attention: rows [t0, t1) read keys [lo, t1).
struct Chunk {
  int64_t t0, t1, lo;
};

std::vector<Chunk> window_chunks(int64_t T, int64_t window) {
  std::vector<Chunk> chunks;
  for (int64_t t0 = 0; t0 < T; t0 += kWindowChunk) {
    const int64_t t1 = std::min(T, t0 + kWindowChunk);
    chunks.push_back({t0, t1, std::max<int64_t>(0, t0 - window + 1)});
  }
  return chunks;
}

// The additive mask of a chunk, (B or 1, 1, t1 - t0, t1 - lo): causality, the window and padding.
at::Tensor chunk_mask(const Masking& mk, const Chunk& ch, const at::TensorOptions& opts) {
  const auto lopt = opts.dtype(at::kLong);
  const auto qi = at::arange(ch.t0, ch.t1, lopt).view({-1, 1});
  const auto ki = at::arange(ch.lo, ch.t1, lopt).view({1, -1});
  const auto hidden = (ki > qi).logical_or_((qi - ki) >= mk.window);
  const int64_t rows = ch.t1 - ch.t0, cols = ch.t1 - ch.lo;
  auto m = at::zeros({rows, cols}, opts).masked_fill_(hidden, -std::numeric_limits<double>::infinity());
  if (!mk.key_bias.defined()) return m.view({1, 1, rows, cols});
  const int64_t B = mk.key_bias.size(0);
  return (mk.key_bias.narrow(1, ch.lo, cols).view({B, 1, 1, cols}) + m.view({1, 1, rows, cols})).contiguous();
}

// Attention of q (B, Hq, T, hd) over k, v (B, Hk, T, hd) (GQA, strided views) under causality and
// mk: (o (B, Hq, T, hd), laid out (B, T, Hq, hd), and its log-sum-exp (B, Hq, T)).
std::tuple<at::Tensor, at::Tensor> masked_flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const Masking& mk, double scale) {
  if (mk.window == 0) {
    const int64_t B = q.size(0), T = q.size(2);
    return at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, /*is_causal=*/true,
                                                           mk.key_bias.view({B, 1, 1, T}), scale);
  }
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  auto o = at::empty({B, T, H, hd}, q.options()).transpose(1, 2);
  at::Tensor lse;
  for (const auto& ch : window_chunks(T, mk.window)) {
    const int64_t rows = ch.t1 - ch.t0, cols = ch.t1 - ch.lo;
    const auto [oc, lc] = at::_scaled_dot_product_flash_attention_for_cpu(
        q.narrow(2, ch.t0, rows), k.narrow(2, ch.lo, cols), v.narrow(2, ch.lo, cols), 0.0, /*is_causal=*/false,
        chunk_mask(mk, ch, q.options()), scale);
    if (!lse.defined()) lse = at::empty({B, H, T}, lc.options());
    o.narrow(2, ch.t0, rows).copy_(oc);
    lse.narrow(2, ch.t0, rows).copy_(lc);
  }
  return {o, lse};
}

// The gradients (dq, dk, dv) of masked_flash_forward, in the same chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_flash_backward(const at::Tensor& d_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& o, const at::Tensor& lse,
                                                                     const Masking& mk, double scale) {
  if (mk.window == 0) {
    const int64_t B = q.size(0), T = q.size(2);
    return at::_scaled_dot_product_flash_attention_for_cpu_backward(d_out, q, k, v, o, lse, 0.0, /*is_causal=*/true,
                                                                    mk.key_bias.view({B, 1, 1, T}), scale);
  }
  const int64_t T = q.size(2);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  for (const auto& ch : window_chunks(T, mk.window)) {
    const int64_t rows = ch.t1 - ch.t0, cols = ch.t1 - ch.lo;
    const auto [a, b, c] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        d_out.narrow(2, ch.t0, rows), q.narrow(2, ch.t0, rows), k.narrow(2, ch.lo, cols), v.narrow(2, ch.lo, cols),
        o.narrow(2, ch.t0, rows), lse.narrow(2, ch.t0, rows), 0.0, /*is_causal=*/false, chunk_mask(mk, ch, q.options()),
        scale);
    dq.narrow(2, ch.t0, rows).copy_(a);
    dk.narrow(2, ch.lo, cols).add_(b);
    dv.narrow(2, ch.lo, cols).add_(c);
  }
  return {dq, dk, dv};
}

// The computed query heads' blocks of W_o^T, (H * hd, d) in the compute dtype.
at::Tensor gather_wo(const at::Tensor& wot, const HeadPlan& p, int64_t hd, int64_t d, at::ScalarType compute) {
  const int64_t block = hd * d;
  auto wo = at::empty({p.heads() * hd, d}, wot.options());
  gather_rows(static_cast<const char*>(wot.const_data_ptr()), block, p.o_blocks.data(), p.heads(), block,
              static_cast<char*>(wo.mutable_data_ptr()), block, wot.element_size());
  return wo.to(compute);
}

// The attention of a plan's query heads q (B, H, T, hd) over its K/V heads k, v (B, c, T, hd), one
// call per run: o (B, H, T, hd) laid out (B, T, H, hd) and, with lse, each run's log-sum-exp. One
// run (every group keeping as many heads) is one call, its output used as is.
struct Attention {
  at::Tensor o;
  std::vector<at::Tensor> lse;  // per run, when asked for
};

Attention attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const HeadPlan& p, const Masking& mk,
                 double scale, bool with_lse) {
  const auto run_of = [&](const at::Tensor& t, const HeadPlan::Run& run) {
    return t.narrow(1, run.first_head, run.heads_per_group * run.groups);
  };
  const auto kv_of = [&](const at::Tensor& t, const HeadPlan::Run& run) {
    return t.narrow(1, run.first_group, run.groups);
  };
  Attention a;
  if (p.runs.size() > 1) {
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
    a.o = at::empty({B, T, H, hd}, q.options()).transpose(1, 2);
  }
  for (const auto& run : p.runs) {
    const auto qr = run_of(q, run), kr = kv_of(k, run), vr = kv_of(v, run);
    at::Tensor o, lse;
    if (!with_lse && mk.plain()) {
      o = at::scaled_dot_product_attention(qr, kr, vr, std::nullopt, 0.0, /*is_causal=*/true, scale,
                                           /*enable_gqa=*/true);
    } else {
      std::tie(o, lse) = mk.plain() ? at::_scaled_dot_product_flash_attention_for_cpu(qr, kr, vr, 0.0,
                                                                                       /*is_causal=*/true,
                                                                                       std::nullopt, scale)
                                    : masked_flash_forward(qr, kr, vr, mk, scale);
    }
    if (with_lse) a.lse.push_back(lse);
    if (p.runs.size() > 1) {
      run_of(a.o, run).copy_(o);
    } else {
      a.o = o;
    }
  }
  return a;
}

// The gradients (dq, dk, dv) of attend, run by run, written into the q, k and v blocks of dqkv (B*T,
// width), laid out as the projection.
void attend_backward(at::Tensor& dqkv, const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const Attention& a, const HeadPlan& p, const Masking& mk, double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), c = k.size(1);
  const auto dq_all = dqkv.narrow(1, 0, H * hd).view({B, T, H, hd});
  const auto dk_all = dqkv.narrow(1, H * hd, c * hd).view({B, T, c, hd});
  const auto dv_all = dqkv.narrow(1, (H + c) * hd, c * hd).view({B, T, c, hd});
  for (size_t i = 0; i < p.runs.size(); ++i) {
    const auto& run = p.runs[i];
    const int64_t h0 = run.first_head, nh = run.heads_per_group * run.groups, g0 = run.first_group, ng = run.groups;
    const auto qr = q.narrow(1, h0, nh), kr = k.narrow(1, g0, ng), vr = v.narrow(1, g0, ng);
    const auto dor = d_out.narrow(1, h0, nh), o = a.o.narrow(1, h0, nh);
    const auto [dq, dk, dv] = mk.plain() ? at::_scaled_dot_product_flash_attention_for_cpu_backward(
                                               dor, qr, kr, vr, o, a.lse[i], 0.0, /*is_causal=*/true, std::nullopt,
                                               scale)
                                         : masked_flash_backward(dor, qr, kr, vr, o, a.lse[i], mk, scale);
    dq_all.narrow(2, h0, nh).copy_(dq.transpose(1, 2));
    dk_all.narrow(2, g0, ng).copy_(dk.transpose(1, 2));
    dv_all.narrow(2, g0, ng).copy_(dv.transpose(1, 2));
  }
}

// unit_scale of sample s per computed query head (H,), in the compute dtype.
at::Tensor head_scales(const at::Tensor& us, int64_t s, const HeadPlan& p) {
  const auto slots = at::from_blob(const_cast<int32_t*>(p.head_slot.data()), {p.heads()}, at::kInt);
  return us[s].index_select(0, slots.to(at::kLong));
}

// q/k/v of one sample: the projection qkv (B*T, (H + 2c)*hd) onto the plan's gathered rows w (bias
// gathered alike and added), normed and rotated in place unless keep_pre, in which case the rotated
// copy is returned and the projection left in pre.
at::Tensor project_qkv(const at::Tensor& xb, const at::Tensor& wqkv, const std::optional<at::Tensor>& b_qkv,
                       const HeadPlan& p, at::ScalarType compute, at::Tensor& w, at::Tensor& pre, bool keep_pre,
                       const Shapes& sh, const at::Tensor& cs, const at::Tensor& sn, const int64_t* pos,
                       const std::optional<at::Tensor>& qn, const std::optional<at::Tensor>& kn, double eps) {
  const int64_t width = (p.heads() + 2 * p.groups()) * sh.hd;
  w = gather_qkv(wqkv, p, sh.hd * sh.d).view({width, sh.d}).to(compute);
  std::optional<at::Tensor> bias;
  if (b_qkv) bias = gather_qkv(*b_qkv, p, sh.hd).to(compute);
  pre = gemm_nt(xb, w, bias);
  if (!pre.is_contiguous()) pre = pre.contiguous();
  auto post = keep_pre ? pre.clone() : pre;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, post.scalar_type(), "masked_attention_cpu", [&] {
    norm_rope_inplace<scalar_t>(post, sh.T, p.heads(), p.groups(), sh.hd, cs, sn, pos, qn, kn, eps);
  });
  return post;
}

// head_keep as contiguous bool (S, G, r); undefined when absent.
at::Tensor contiguous_head_keep(const std::optional<at::Tensor>& head_keep) {
  return head_keep ? head_keep->contiguous() : at::Tensor();
}

const bool* sample_head_keep(const at::Tensor& hk, int64_t s, const Shapes& sh) {
  return hk.defined() ? hk.const_data_ptr<bool>() + s * sh.G * sh.r : nullptr;
}

}  // namespace

at::Tensor masked_attention_cpu(const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& w_o_t,
                                const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keep_idx,
                                const at::Tensor& keep_count, const std::optional<at::Tensor>& b_qkv,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                const std::optional<at::Tensor>& unit_scale, double norm_eps, double scale,
                                const std::optional<at::Tensor>& position_ids,
                                const std::optional<at::Tensor>& attention_mask, int64_t window,
                                const std::optional<at::Tensor>& head_keep) {
  const Shapes sh = check_inputs(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                                 position_ids, attention_mask, window, head_keep);
  const int64_t S = sh.S, B = sh.B, T = sh.T, d = sh.d, hd = sh.hd, G = sh.G, r = sh.r;
  const auto compute = compute_dtype(x.scalar_type());  // see compute_dtype.h
  const auto xs = x.contiguous();
  const auto wqkv = w_qkv.contiguous(), wot = w_o_t.contiguous();
  const auto cs = cos.to(compute).contiguous(), sn = sin.to(compute).contiguous();
  std::optional<at::Tensor> bias, qn, kn, us;
  if (b_qkv) bias = b_qkv->contiguous();
  if (q_norm) qn = q_norm->to(compute).contiguous();
  if (k_norm) kn = k_norm->to(compute).contiguous();
  if (unit_scale) us = unit_scale->to(compute).contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto hk = contiguous_head_keep(head_keep);
  const auto pos_t = checked_positions(position_ids, cos.size(0));
  const int64_t* pos = pos_t.defined() ? pos_t.const_data_ptr<int64_t>() : nullptr;
  const Masking mk = make_masking(attention_mask, window, T, compute);
  auto out = at::empty_like(xs);

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = kept_groups(counts, indices, s, G);
    const HeadPlan plan = plan_heads(indices + s * G, c, r, sample_head_keep(hk, s, sh));
    const int64_t H = plan.heads(), cg = plan.groups(), q_width = H * hd;
    auto dst = out[s].view({B * T, d});
    if (H == 0) {
      dst.zero_();
      continue;
    }
    const auto xb = xs[s].view({B * T, d}).to(compute);
    at::Tensor w, pre;  // normed and rotated in place: qkv below is the same tensor as pre
    const auto qkv = project_qkv(xb, wqkv, bias, plan, compute, w, pre, false, sh, cs, sn, pos, qn, kn, norm_eps);
    const auto q = qkv.narrow(1, 0, q_width).view({B, T, H, hd}).transpose(1, 2);
    const auto k = qkv.narrow(1, q_width, cg * hd).view({B, T, cg, hd}).transpose(1, 2);
    const auto v = qkv.narrow(1, q_width + cg * hd, cg * hd).view({B, T, cg, hd}).transpose(1, 2);
    const auto att = attend(q, k, v, plan, mk, scale, /*with_lse=*/false).o;
    auto att2d = att.transpose(1, 2).reshape({B * T, q_width});
    if (us) att2d = (att2d.view({B * T, H, hd}) * head_scales(*us, s, plan).view({1, H, 1})).view({B * T, q_width});
    gemm_nt_into(dst, att2d, gather_wo(wot, plan, hd, d, compute).t());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
masked_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_qkv,
                              const at::Tensor& w_o_t, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& keep_idx, const at::Tensor& keep_count,
                              const std::optional<at::Tensor>& b_qkv, const std::optional<at::Tensor>& q_norm,
                              const std::optional<at::Tensor>& k_norm, const std::optional<at::Tensor>& unit_scale,
                              double norm_eps, double scale, const std::optional<at::Tensor>& position_ids,
                              const std::optional<at::Tensor>& attention_mask, int64_t window,
                              const std::optional<at::Tensor>& head_keep, std::array<bool, 7> output_mask) {
  const Shapes sh = check_inputs(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                                 position_ids, attention_mask, window, head_keep);
  const int64_t S = sh.S, B = sh.B, T = sh.T, d = sh.d, hd = sh.hd, G = sh.G, r = sh.r, rows = sh.rows;
  const int64_t BT = B * T;
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "masked_attention_backward: grad_out ", grad_out.sizes(), " != x ",
              x.sizes());
  const auto compute = compute_dtype(x.scalar_type());
  const auto xs = x.contiguous(), gys = grad_out.contiguous();
  const auto wqkv = w_qkv.contiguous(), wot = w_o_t.contiguous();
  const auto cs = cos.to(compute).contiguous(), sn = sin.to(compute).contiguous();
  std::optional<at::Tensor> bias, qn, kn, us;
  if (b_qkv) bias = b_qkv->contiguous();
  if (q_norm) qn = q_norm->to(compute).contiguous();
  if (k_norm) kn = k_norm->to(compute).contiguous();
  if (unit_scale) us = unit_scale->to(compute).contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto hk = contiguous_head_keep(head_keep);

  const auto pos_t = checked_positions(position_ids, cos.size(0));
  const int64_t* pos = pos_t.defined() ? pos_t.const_data_ptr<int64_t>() : nullptr;
  const Masking mk = make_masking(attention_mask, window, T, compute);

  const bool need_x = output_mask[0], need_wqkv = output_mask[1], need_wo = output_mask[2];
  const bool need_b = output_mask[3] && b_qkv.has_value(), need_qn = output_mask[4] && q_norm.has_value();
  const bool need_kn = output_mask[5] && k_norm.has_value(), need_scale = output_mask[6] && unit_scale.has_value();
  const bool need_dqkv = need_x || need_wqkv || need_b || need_qn || need_kn;
  const auto fopt = xs.options().dtype(at::kFloat);
  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, xs.options()); };
  auto dx = need_x ? at::empty_like(xs) : empty();
  auto dwqkv = need_wqkv ? at::zeros({G, rows, d}, fopt) : empty();  // float accumulators
  auto dwo = need_wo ? at::zeros({G, r * hd, d}, fopt) : empty();
  auto db = need_b ? at::zeros({G, rows}, fopt) : empty();
  auto dqn_rows = need_qn ? at::zeros({BT, hd}, fopt) : empty();
  auto dkn_rows = need_kn ? at::zeros({BT, hd}, fopt) : empty();
  auto dscale = need_scale ? at::zeros({S, G}, fopt) : empty();

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = kept_groups(counts, indices, s, G);
    const HeadPlan plan = plan_heads(indices + s * G, c, r, sample_head_keep(hk, s, sh));
    const int64_t H = plan.heads(), cg = plan.groups(), q_width = H * hd, width = q_width + 2 * cg * hd;
    if (H == 0) {
      if (need_x) dx[s].zero_();
      continue;
    }
    const auto xb = xs[s].view({BT, d}).to(compute);
    const auto gy = gys[s].view({BT, d}).to(compute);
    at::Tensor w, pre;
    const auto post = project_qkv(xb, wqkv, bias, plan, compute, w, pre, qn.has_value() || kn.has_value(), sh, cs, sn,
                                  pos, qn, kn, norm_eps);
    const auto q = post.narrow(1, 0, q_width).view({B, T, H, hd}).transpose(1, 2);
    const auto k = post.narrow(1, q_width, cg * hd).view({B, T, cg, hd}).transpose(1, 2);
    const auto v = post.narrow(1, q_width + cg * hd, cg * hd).view({B, T, cg, hd}).transpose(1, 2);
    const Attention a = attend(q, k, v, plan, mk, scale, /*with_lse=*/true);
    const auto wo = gather_wo(wot, plan, hd, d, compute);
    auto d_att = at::mm(gy, wo.t());  // (BT, q_width): gradient of the (scaled) attention output
    auto att2d = a.o.transpose(1, 2).reshape({BT, q_width});  // a view of o: never written
    if (us) {
      if (need_scale) {  // per computed group: its heads' features are contiguous, a run's groups alike
        float* ds = dscale.mutable_data_ptr<float>() + s * G;
        for (const auto& run : plan.runs) {
          const int64_t f0 = run.first_head * hd, fw = run.heads_per_group * hd;
          const auto g = (att2d.narrow(1, f0, run.groups * fw).view({BT, run.groups, fw}) *
                          d_att.narrow(1, f0, run.groups * fw).view({BT, run.groups, fw}))
                             .sum({0, 2})
                             .to(at::kFloat)
                             .contiguous();
          const float* gp = g.const_data_ptr<float>();
          for (int64_t i = 0; i < run.groups; ++i) ds[plan.group_slot[run.first_group + i]] += gp[i];
        }
      }
      const auto a_head = head_scales(*us, s, plan).view({1, H, 1});
      d_att.view({BT, H, hd}).mul_(a_head);
      att2d = (att2d.view({BT, H, hd}) * a_head).view({BT, q_width});
    }
    if (need_wo) {
      const auto g = at::mm(att2d.t(), gy).to(at::kFloat).contiguous();  // (q_width, d)
      scatter_add_rows(dwo.mutable_data_ptr<float>(), hd * d, plan.o_blocks.data(), H, hd * d, g, hd * d);
    }
    if (!need_dqkv) continue;
    const auto d_out = d_att.view({B, T, H, hd}).transpose(1, 2);
    auto dqkv = at::empty({BT, width}, pre.options());
    attend_backward(dqkv, d_out, q, k, v, a, plan, mk, scale);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dqkv.scalar_type(), "masked_attention_backward", [&] {
      norm_rope_backward_inplace<scalar_t>(dqkv, pre, T, H, cg, hd, cs, sn, pos, qn, kn, norm_eps,
                                           need_qn ? dqn_rows.mutable_data_ptr<float>() : nullptr,
                                           need_kn ? dkn_rows.mutable_data_ptr<float>() : nullptr);
    });
    if (need_b) scatter_add_qkv(db, dqkv.sum(0).to(at::kFloat).contiguous(), plan, hd);
    if (need_x) {
      auto dst = dx[s].view({BT, d});
      gemm_nt_into(dst, dqkv, w.t());
    }
    if (need_wqkv) scatter_add_qkv(dwqkv, at::mm(dqkv.t(), xb).to(at::kFloat).contiguous(), plan, hd * d);
  }
  const auto wdtype = w_qkv.scalar_type();
  return {dx,
          need_wqkv ? dwqkv.to(wdtype) : dwqkv,
          need_wo ? dwo.to(wdtype) : dwo,
          need_b ? db.to(b_qkv->scalar_type()) : db,
          need_qn ? dqn_rows.sum(0).to(q_norm->scalar_type()) : dqn_rows,
          need_kn ? dkn_rows.sum(0).to(k_norm->scalar_type()) : dkn_rows,
          need_scale ? dscale.to(unit_scale->scalar_type()) : dscale};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_attention", &bpp::masked_attention_cpu);
  m.impl("masked_attention_backward", &bpp::masked_attention_backward_cpu);
}
