//! KV budget policies: bound the tokens a sequence keeps in the cache (`--kv-budget N`), choosing which
//! to evict (`--kv-policy`):
//! - `sinks` (StreamingLLM): the first `S` tokens (attention sinks, default 4) and the most recent `N - S`;
//! - `h2o` (Heavy-Hitter Oracle): the most recent `N * recent` (default half) and, of the older ones, the
//!   heaviest: the largest attention probability accumulated over the steps so far.
//!
//! ## A sequence under a budget
//! Its block table's slots are *entries*; after evictions they are no longer positions `0..n`:
//! ```text
//! entries     0 1 2 3 | 4 5 6 7 | 8 9 . .      block_size 4, 10 entries
//! live        1 0 0 1 | 1 1 0 1 | 1 1          per block a u64 mask: holes are evicted tokens
//! positions   0 1 2 3 | 9 10 11 12 | 40 41     original positions: RoPE was applied before caching
//! ```
//! New tokens are appended as entries (live), so entry order is position order. Eviction clears live
//! bits only: the attention kernel skips holes (`KvView`), and the block is not written, which is what
//! keeps a shared prefix block intact. Memory comes back by compaction (manager.rs,
//! `KvCacheManager::compact`): once a full block's live fraction falls below [`COMPACT_BELOW`], the live
//! entries from that block on are packed into private blocks (shared or cached blocks are copied, never
//! written) and the emptied blocks are freed; [`BudgetState::compact`] applies the same permutation to
//! positions, masks and scores.
//!
//! ## H2O scores
//! Per layer and KV head the attention kernel reports each entry's probability of the step, summed over
//! the query heads of the group and the step's query rows (`KvView::score_offset`, no second pass over
//! K); [`BudgetState::add_scores`] accumulates them. One slot holds a token for every layer (a block id
//! names the same rows in every layer's pool), so a token is kept or evicted in all layers at once: its
//! weight is its accumulated probability summed over layers and KV heads.
//!
//! A budget never evicts while the live entries fit: with `budget >= length` a sequence's cache, and
//! so its outputs, are those of `none` bit for bit.

use std::ops::Range;

/// A full block is compacted when fewer than this fraction of its entries are live.
pub const COMPACT_BELOW: f32 = 0.5;

/// Default attention sinks kept by `sinks`.
pub const DEFAULT_SINKS: usize = 4;

/// Default fraction of the budget `h2o` gives to the most recent tokens.
pub const DEFAULT_RECENT: f32 = 0.5;

/// Which tokens a full budget evicts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvPolicy {
    /// Keep everything (the budget is ignored).
    None,
    /// Keep the first `sinks` tokens and the most recent ones.
    Sinks { sinks: usize },
    /// Keep the `recent` fraction most recent tokens and the heaviest of the rest.
    H2o { recent: f32 },
}

impl std::str::FromStr for KvPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(KvPolicy::None),
            "sinks" | "streamingllm" => Ok(KvPolicy::Sinks { sinks: DEFAULT_SINKS }),
            "h2o" => Ok(KvPolicy::H2o { recent: DEFAULT_RECENT }),
            _ => Err(format!("unknown KV policy '{s}': use none, sinks or h2o")),
        }
    }
}

impl std::fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvPolicy::None => write!(f, "none"),
            KvPolicy::Sinks { sinks } => write!(f, "sinks({sinks})"),
            KvPolicy::H2o { recent } => write!(f, "h2o(recent {recent})"),
        }
    }
}

/// A policy and the tokens it may keep per sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvBudget {
    pub tokens: usize,
    pub policy: KvPolicy,
}

impl KvBudget {
    /// `None` when the budget changes nothing (policy `none`).
    pub fn active(self) -> Option<KvBudget> {
        (self.policy != KvPolicy::None).then_some(self)
    }

    /// Checks the budget against the block size and a step of `chunk` new tokens: the kept tokens must
    /// leave room for the policy's parts and one block.
    pub fn check(&self, block_size: usize) -> Result<(), String> {
        if block_size > 64 {
            return Err(format!("a KV budget needs blocks of at most 64 tokens, not {block_size}"));
        }
        let min = match self.policy {
            KvPolicy::None => return Ok(()),
            KvPolicy::Sinks { sinks } => sinks + 1,
            KvPolicy::H2o { recent } => {
                if !(0.0..=1.0).contains(&recent) {
                    return Err(format!("the h2o recent fraction must be within 0..1, not {recent}"));
                }
                2
            }
        };
        if self.tokens < min.max(block_size) {
            return Err(format!(
                "--kv-budget {} is too small for {}: keep at least {} tokens",
                self.tokens,
                self.policy,
                min.max(block_size)
            ));
        }
        Ok(())
    }

    /// The H2O split of the budget: (recent, heavy).
    fn h2o_split(&self, recent: f32) -> (usize, usize) {
        let r = ((self.tokens as f32 * recent).round() as usize).clamp(1, self.tokens);
        (r, self.tokens - r)
    }
}

/// One sequence's entries under a budget (module doc).
#[derive(Clone, Debug)]
pub struct BudgetState {
    budget: KvBudget,
    block_size: usize,
    /// `[entries]` original positions, increasing.
    positions: Vec<u32>,
    /// `[blocks]` bit `o` of `live[b]`: entry `b * block_size + o` is live.
    live: Vec<u64>,
    n_live: usize,
    /// Scores per entry: `n_layers x n_kv_heads` values (h2o), else none.
    width: usize,
    /// `[entries x width]` accumulated probabilities.
    scores: Vec<f32>,
    /// Tokens evicted so far.
    evicted: usize,
}

impl BudgetState {
    /// A sequence with no entries; `n_layers x n_kv_heads` scores per entry for h2o.
    pub fn new(budget: KvBudget, block_size: usize, n_layers: usize, n_kv_heads: usize) -> BudgetState {
        assert!(block_size <= 64, "budget masks hold 64 entries per block");
        let width = if matches!(budget.policy, KvPolicy::H2o { .. }) { n_layers * n_kv_heads } else { 0 };
        BudgetState { budget, block_size, positions: Vec::new(), live: Vec::new(), n_live: 0, width, scores: Vec::new(), evicted: 0 }
    }

    pub fn budget(&self) -> KvBudget {
        self.budget
    }

    /// Entries (slots of the table), live or not.
    pub fn num_entries(&self) -> usize {
        self.positions.len()
    }

    pub fn num_live(&self) -> usize {
        self.n_live
    }

    /// Tokens evicted over the sequence's life.
    pub fn num_evicted(&self) -> usize {
        self.evicted
    }

    /// Whether the policy wants attention probabilities (h2o).
    pub fn wants_scores(&self) -> bool {
        self.width > 0
    }

    /// `[entries]` original positions.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// `[blocks]` live masks.
    pub fn live_masks(&self) -> &[u64] {
        &self.live
    }

    pub fn is_live(&self, entry: usize) -> bool {
        self.live[entry / self.block_size] >> (entry % self.block_size) & 1 == 1
    }

    /// Live entries of block `b`.
    pub fn live_in_block(&self, b: usize) -> usize {
        self.live[b].count_ones() as usize
    }

    /// Appends live entries for the tokens at `positions` (after the last one).
    pub fn push(&mut self, positions: Range<usize>) {
        for pos in positions {
            debug_assert!(self.positions.last().is_none_or(|&p| (p as usize) < pos), "positions must increase");
            let e = self.positions.len();
            if e.is_multiple_of(self.block_size) {
                self.live.push(0);
            }
            self.live[e / self.block_size] |= 1 << (e % self.block_size);
            self.positions.push(pos as u32);
            self.n_live += 1;
        }
        self.scores.resize(self.positions.len() * self.width, 0.0);
    }

    /// Adds one layer's step probabilities `[n_kv_heads x n]` (the kernel's output for the first `n`
    /// entries) to the accumulated scores.
    pub fn add_scores(&mut self, layer: usize, step: &[f32], n: usize) {
        if self.width == 0 {
            return;
        }
        let n_kv = step.len() / n;
        debug_assert!(n <= self.positions.len() && (layer + 1) * n_kv <= self.width);
        for g in 0..n_kv {
            let col = layer * n_kv + g;
            for (e, &p) in step[g * n..(g + 1) * n].iter().enumerate() {
                self.scores[e * self.width + col] += p;
            }
        }
    }

    /// Accumulated probability of `entry` in layer `layer`, KV head `g` of `n_kv` (tests).
    pub fn score(&self, entry: usize, layer: usize, g: usize, n_kv: usize) -> f32 {
        self.scores[entry * self.width + layer * n_kv + g]
    }

    /// A token's weight for h2o: its scores summed over layers and KV heads.
    fn weight(&self, entry: usize) -> f32 {
        self.scores[entry * self.width..(entry + 1) * self.width].iter().sum()
    }

    /// Evicts live entries until at most `budget.tokens` remain, as the policy picks; returns how many.
    pub fn enforce(&mut self) -> usize {
        let n_evict = self.n_live.saturating_sub(self.budget.tokens);
        if n_evict == 0 {
            return 0;
        }
        let live: Vec<usize> = (0..self.positions.len()).filter(|&e| self.is_live(e)).collect();
        let victims: Vec<usize> = match self.budget.policy {
            KvPolicy::None => return 0,
            // the oldest after the sinks
            KvPolicy::Sinks { sinks } => live.iter().copied().skip(sinks).take(n_evict).collect(),
            // the lightest of those older than the recent window (ties: the older goes)
            KvPolicy::H2o { recent } => {
                let (n_recent, _) = self.budget.h2o_split(recent);
                let old = &live[..live.len() - n_recent.min(live.len())];
                let mut weighted: Vec<(f32, usize)> = old.iter().map(|&e| (self.weight(e), e)).collect();
                let n_evict = n_evict.min(weighted.len());
                if n_evict < weighted.len() {
                    weighted.select_nth_unstable_by(n_evict, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                }
                weighted[..n_evict].iter().map(|&(_, e)| e).collect()
            }
        };
        for &e in &victims {
            self.live[e / self.block_size] &= !(1 << (e % self.block_size));
        }
        self.n_live -= victims.len();
        self.evicted += victims.len();
        victims.len()
    }

    /// The first full block whose live fraction is below [`COMPACT_BELOW`]: where compaction starts.
    pub fn compact_from(&self) -> Option<usize> {
        let full = self.positions.len() / self.block_size;
        (0..full).find(|&b| (self.live_in_block(b) as f32) < COMPACT_BELOW * self.block_size as f32)
    }

    /// Packs the live entries from block `first_block` on to the front of that range, as the manager
    /// moved their slots: entries before it are unchanged.
    pub fn compact(&mut self, first_block: usize) {
        let start = first_block * self.block_size;
        let keep: Vec<usize> = (start..self.positions.len()).filter(|&e| self.is_live(e)).collect();
        for (k, &e) in keep.iter().enumerate() {
            let d = start + k;
            self.positions[d] = self.positions[e];
            self.scores.copy_within(e * self.width..(e + 1) * self.width, d * self.width);
        }
        let n = start + keep.len();
        self.positions.truncate(n);
        self.scores.truncate(n * self.width);
        self.live.truncate(first_block);
        let mut left = keep.len();
        while left > 0 {
            let k = left.min(self.block_size);
            self.live.push(if k == 64 { u64::MAX } else { (1u64 << k) - 1 });
            left -= k;
        }
    }

    /// Checks the counts and masks (tests, debug builds).
    pub fn check(&self) -> Result<(), String> {
        let counted: usize = self.live.iter().map(|m| m.count_ones() as usize).sum();
        if counted != self.n_live {
            return Err(format!("{} live entries counted, {} recorded", counted, self.n_live));
        }
        if self.live.len() != self.positions.len().div_ceil(self.block_size) {
            return Err(format!("{} masks for {} entries", self.live.len(), self.positions.len()));
        }
        if let Some(m) = self.live.last().filter(|_| !self.positions.len().is_multiple_of(self.block_size)) {
            if m >> (self.positions.len() % self.block_size) != 0 {
                return Err("a live bit beyond the last entry".into());
            }
        }
        if !self.positions.windows(2).all(|w| w[0] < w[1]) {
            return Err("positions do not increase".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(policy: KvPolicy, tokens: usize) -> BudgetState {
        BudgetState::new(KvBudget { tokens, policy }, 4, 2, 1)
    }

    fn live(s: &BudgetState) -> Vec<u32> {
        (0..s.num_entries()).filter(|&e| s.is_live(e)).map(|e| s.positions()[e]).collect()
    }

    #[test]
    fn sinks_keep_the_first_and_the_most_recent() {
        let mut s = state(KvPolicy::Sinks { sinks: 2 }, 6);
        s.push(0..6);
        assert_eq!(s.enforce(), 0, "nothing goes while the budget holds");
        s.push(6..9);
        assert_eq!(s.enforce(), 3);
        assert_eq!(live(&s), vec![0, 1, 5, 6, 7, 8]);
        s.check().unwrap();
    }

    #[test]
    fn h2o_keeps_the_recent_and_the_heaviest() {
        let mut s = state(KvPolicy::H2o { recent: 0.5 }, 4);
        s.push(0..6);
        // layer 0 and 1 scores: entry 1 heaviest, then entry 3
        s.add_scores(0, &[0.1, 0.5, 0.0, 0.2, 0.1, 0.1], 6);
        s.add_scores(1, &[0.0, 0.4, 0.1, 0.3, 0.0, 0.1], 6);
        assert_eq!(s.enforce(), 2);
        assert_eq!(live(&s), vec![1, 3, 4, 5]);
        s.check().unwrap();
    }

    #[test]
    fn compaction_packs_live_entries_and_their_scores() {
        let mut s = state(KvPolicy::Sinks { sinks: 1 }, 3);
        s.push(0..10);
        assert_eq!(s.enforce(), 7);
        assert_eq!(live(&s), vec![0, 8, 9]);
        assert_eq!(s.compact_from(), Some(0));
        s.compact(0);
        s.check().unwrap();
        assert_eq!((s.num_entries(), s.positions()), (3, &[0u32, 8, 9][..]));
        s.push(10..11);
        s.check().unwrap();
        assert_eq!(live(&s), vec![0, 8, 9, 10]);
    }
}
