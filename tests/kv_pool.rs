//! Paged KV block pool: invariants under random operation sequences, prefix reuse, LRU eviction, hash
//! collisions, forks, and a multi-turn conversation.
//!
//! The oracle of the random tests is a shadow of the device pool: every slot records which token prefix
//! its KV was computed for (position + a fingerprint of `tokens[..=pos]`). After every operation each live
//! sequence's computed positions must map to slots holding exactly its own prefix, so a wrongly shared,
//! evicted, overwritten or un-copied block fails at once, whatever the hash function.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use pagellm::kv::{BlockHash, BlockTable, HashFn, KvCacheConfig, KvCacheManager, TokenId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn manager(num_blocks: usize, block_size: usize, hash_fn: HashFn) -> KvCacheManager {
    KvCacheManager::new(KvCacheConfig { num_blocks, block_size, hash_fn }).unwrap()
}

fn default_manager(num_blocks: usize, block_size: usize) -> KvCacheManager {
    manager(num_blocks, block_size, pagellm::kv::hash_block_tokens)
}

/// Every block collides with every other.
fn constant_hash(_: Option<BlockHash>, _: &[TokenId]) -> BlockHash {
    BlockHash(42)
}

/// Five buckets: collisions everywhere, with and without equal parents.
fn tiny_hash(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    let sum: u64 = tokens.iter().map(|&t| u64::from(t)).sum();
    BlockHash((parent.map_or(7, |p| p.0) * 3 + sum) % 5)
}

/// Ignores the parent: equal tokens after different prefixes collide.
fn parentless_hash(_: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    BlockHash(u64::from(tokens[0]) % 3)
}

// ---------------------------------------------------------------------------------------------------------
// Random operation sequences against the shadow pool.

struct Seq {
    tokens: Vec<TokenId>,
    /// `fps[p]` fingerprints `tokens[..=p]`.
    fps: Vec<u64>,
    num_computed: usize,
    table: BlockTable,
}

impl Seq {
    fn new(tokens: Vec<TokenId>, num_computed: usize, table: BlockTable) -> Self {
        let mut s = Seq { tokens: Vec::new(), fps: Vec::new(), num_computed, table };
        tokens.into_iter().for_each(|t| s.push(t));
        s
    }

    fn push(&mut self, t: TokenId) {
        let mut h = DefaultHasher::new();
        (self.fps.last(), t).hash(&mut h);
        self.fps.push(h.finish());
        self.tokens.push(t);
    }
}

struct Sim {
    kv: KvCacheManager,
    rng: StdRng,
    seqs: Vec<Seq>,
    /// Per pool slot: (position, prefix fingerprint) of the KV written there.
    shadow: Vec<Option<(usize, u64)>>,
    stems: Vec<Vec<TokenId>>,
    hits: usize,
    refound: usize,
    exhausted: usize,
    forks: usize,
}

impl Sim {
    fn new(num_blocks: usize, block_size: usize, hash_fn: HashFn, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let stems = (0..3).map(|_| (0..40).map(|_| rng.gen_range(0..1000)).collect()).collect();
        Sim {
            kv: manager(num_blocks, block_size, hash_fn),
            rng,
            seqs: Vec::new(),
            shadow: vec![None; num_blocks * block_size],
            stems,
            hits: 0,
            refound: 0,
            exhausted: 0,
            forks: 0,
        }
    }

    fn bs(&self) -> usize {
        self.kv.block_size()
    }

    fn check(&self, op: &str) {
        let tables: Vec<&BlockTable> = self.seqs.iter().map(|s| &s.table).collect();
        if let Err(e) = self.kv.check_invariants(&tables) {
            panic!("after {op}: {e}");
        }
        for (i, s) in self.seqs.iter().enumerate() {
            assert!(s.num_computed <= s.table.num_tokens(), "after {op}: seq {i} computed beyond its slots");
            for p in 0..s.num_computed {
                let got = self.shadow[s.table.slot(p)];
                assert_eq!(got, Some((p, s.fps[p])), "after {op}: seq {i} position {p} reads another prefix's KV");
            }
        }
    }

    /// A prompt sharing a random-length piece of a stem, then a few tokens from a tiny alphabet (so
    /// equal blocks also arise by chance), and its cached prefix.
    fn admit(&mut self) {
        let stem = &self.stems[self.rng.gen_range(0..self.stems.len())];
        let mut tokens = stem[..self.rng.gen_range(0..=stem.len())].to_vec();
        let extra = self.rng.gen_range(1..12);
        tokens.extend((0..extra).map(|_| self.rng.gen_range(0..3)));
        let (table, n) = self.kv.find_cached_prefix(&tokens);
        assert!(n % self.bs() == 0 && n < tokens.len() && n == table.len() * self.bs());
        self.hits += usize::from(n > 0);
        self.seqs.push(Seq::new(tokens, n, table));
    }

    /// Prefill a chunk, or decode one token; on exhaustion free a random victim.
    fn step(&mut self, i: usize) {
        if self.seqs[i].num_computed == self.seqs[i].tokens.len() {
            let t = self.rng.gen_range(0..3);
            self.seqs[i].push(t);
        }
        let chunk = self.rng.gen_range(1..=3 * self.bs());
        let s = &mut self.seqs[i];
        let num_new = chunk.min(s.tokens.len() - s.num_computed);
        if self.kv.allocate_slots(&mut s.table, &s.tokens, s.num_computed, num_new).is_some() {
            for p in s.num_computed..s.num_computed + num_new {
                self.shadow[s.table.slot(p)] = Some((p, s.fps[p]));
            }
            s.num_computed += num_new;
        } else {
            self.exhausted += 1;
            let victim = self.rng.gen_range(0..self.seqs.len());
            self.finish(victim);
        }
        if !self.seqs.is_empty() && self.rng.gen_bool(0.3) {
            let j = i.min(self.seqs.len() - 1);
            let s = &mut self.seqs[j];
            self.kv.cache_full_blocks(&mut s.table, &s.tokens, s.num_computed);
        }
    }

    /// A whole fork, or (half the time) a fork of a random computed prefix, as the engine continues a
    /// finished sequence token by token.
    fn fork(&mut self, i: usize) {
        let s = &self.seqs[i];
        if s.num_computed != s.table.num_tokens() || s.num_computed == 0 {
            return; // forks happen after a step computed every slot
        }
        let n = if self.rng.gen_bool(0.5) { s.num_computed } else { self.rng.gen_range(1..=s.num_computed) };
        let forked = if n == s.num_computed { self.kv.fork(&s.table) } else { self.kv.fork_prefix(&s.table, n) };
        let Some(forked) = forked else { return };
        let bs = self.bs();
        assert_eq!(forked.table.num_tokens(), n);
        assert_eq!(forked.table.block_ids()[..n / bs], s.table.block_ids()[..n / bs], "full blocks are shared");
        if let Some(c) = forked.copy {
            assert_eq!(c.src, s.table.block_ids()[n / bs]);
            for off in 0..bs {
                self.shadow[c.dst as usize * bs + off] = self.shadow[c.src as usize * bs + off];
            }
        }
        let tokens = s.tokens[..n].to_vec();
        self.forks += 1;
        self.seqs.push(Seq::new(tokens, n, forked.table));
    }

    /// Commits, frees, and (half the time) looks the sequence up again at once: nothing was evicted in
    /// between, so every block it had cached must be found again.
    fn finish(&mut self, i: usize) {
        let mut s = self.seqs.swap_remove(i);
        self.kv.cache_full_blocks(&mut s.table, &s.tokens, s.num_computed);
        let cached = s.table.num_cached_blocks();
        self.kv.free(s.table);
        self.check("free");
        if self.rng.gen_bool(0.5) {
            let tokens = s.tokens[..s.num_computed.max(1)].to_vec();
            let (table, n) = self.kv.find_cached_prefix(&tokens);
            let expect = cached.min((tokens.len() - 1) / self.bs());
            assert!(table.len() >= expect, "freed sequence cached {expect} findable blocks, found {}", table.len());
            self.refound += 1;
            self.seqs.push(Seq::new(tokens, n, table));
        }
    }

    fn run(&mut self, ops: usize) {
        for _ in 0..ops {
            let roll = self.rng.gen_range(0..100);
            let op = if self.seqs.is_empty() || (roll < 15 && self.seqs.len() < 12) {
                self.admit();
                "admit"
            } else {
                let i = self.rng.gen_range(0..self.seqs.len());
                match roll {
                    0..=69 => {
                        self.step(i);
                        "step"
                    }
                    70..=79 => {
                        self.fork(i);
                        "fork"
                    }
                    _ => {
                        self.finish(i);
                        "finish"
                    }
                }
            };
            self.check(op);
        }
        while let Some(s) = self.seqs.pop() {
            self.kv.free(s.table);
        }
        self.check("drain");
        let u = self.kv.usage();
        assert_eq!((u.used_blocks, u.free_blocks), (0, u.num_blocks), "blocks leaked");
    }
}

fn random_runs(hash_fn: HashFn, block_sizes: &[usize]) -> (usize, usize, usize, u64) {
    let (mut hits, mut exhausted, mut forks, mut evictions) = (0, 0, 0, 0);
    for &bs in block_sizes {
        for seed in 0..4 {
            let num_blocks = 96 / bs + 8;
            let mut sim = Sim::new(num_blocks, bs, hash_fn, seed * 31 + bs as u64);
            sim.run(3000);
            hits += sim.hits;
            exhausted += sim.exhausted;
            forks += sim.forks;
            evictions += sim.kv.usage().evictions;
            assert!(sim.refound > 0);
        }
    }
    (hits, exhausted, forks, evictions)
}

#[test]
fn random_ops_keep_invariants_and_contents() {
    let (hits, exhausted, forks, evictions) = random_runs(pagellm::kv::hash_block_tokens, &[1, 4, 16]);
    println!("prefix hits {hits}, exhausted {exhausted}, forks {forks}, evictions {evictions}");
    assert!(hits > 100 && exhausted > 100 && forks > 100 && evictions > 100, "the runs must exercise every path");
}

#[test]
fn random_ops_with_colliding_hashes_never_share_wrong_blocks() {
    for hash_fn in [tiny_hash as HashFn, parentless_hash, constant_hash] {
        let (hits, exhausted, ..) = random_runs(hash_fn, &[1, 4]);
        assert!(hits > 0 && exhausted > 0);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic cases.

/// Prefills `tokens` on top of its cached prefix, commits, frees; returns the cached token count.
fn prefill_and_free(kv: &mut KvCacheManager, tokens: &[TokenId]) -> usize {
    let (mut t, n) = kv.find_cached_prefix(tokens);
    kv.allocate_slots(&mut t, tokens, n, tokens.len() - n).expect("pool large enough");
    kv.cache_full_blocks(&mut t, tokens, tokens.len());
    kv.check_invariants(&[&t]).unwrap();
    kv.free(t);
    kv.check_invariants(&[]).unwrap();
    n
}

/// Cached tokens of `tokens` now, without keeping the blocks.
fn probe(kv: &mut KvCacheManager, tokens: &[TokenId]) -> usize {
    let (t, n) = kv.find_cached_prefix(tokens);
    kv.free(t);
    n
}

fn seq(start: TokenId, len: usize) -> Vec<TokenId> {
    (start..start + len as TokenId).collect()
}

#[test]
fn cached_prefix_is_found_after_free_until_evicted() {
    let mut kv = default_manager(6, 4);
    let a = seq(100, 17); // 4 full blocks + 1 partial
    prefill_and_free(&mut kv, &a);
    assert_eq!(probe(&mut kv, &a), 16);
    // Two blocks are empty (a's partial one went back to the front): taking them evicts nothing.
    let mut t = kv.new_table();
    let other = seq(900, 20);
    kv.allocate_slots(&mut t, &other, 0, 8).unwrap();
    assert_eq!((kv.usage().evictions, probe(&mut kv, &a)), (0, 16));
    // Now each new block evicts one of a's, its last block first.
    for (k, expect) in [(8, 12), (12, 8), (16, 4)] {
        kv.allocate_slots(&mut t, &other, k, 4).unwrap();
        kv.check_invariants(&[&t]).unwrap();
        assert_eq!(probe(&mut kv, &a), expect);
    }
    assert_eq!(kv.usage().evictions, 3);
    kv.free(t);
    kv.check_invariants(&[]).unwrap();
}

#[test]
fn lru_evicts_the_least_recently_freed_cached_block_first() {
    let mut kv = default_manager(4, 2);
    let (a, b) = (vec![1, 2, 3], vec![5, 6, 7]); // one full block each, plus a partial one
    prefill_and_free(&mut kv, &a);
    prefill_and_free(&mut kv, &b);
    let first_block = |kv: &mut KvCacheManager, tokens: &[TokenId]| {
        let (t, _) = kv.find_cached_prefix(tokens);
        let id = t.block_ids()[0];
        kv.free(t);
        id
    };
    let (blk_a, blk_b) = (first_block(&mut kv, &a), first_block(&mut kv, &b));
    // Front to back: the two empty (partial) blocks, then a's cached block (freed first), then b's.
    assert_eq!(&kv.pool().free_queue_order()[2..], &[blk_a, blk_b]);
    probe(&mut kv, &a); // a becomes the most recently used
    assert_eq!(&kv.pool().free_queue_order()[2..], &[blk_b, blk_a]);
    let mut t = kv.new_table();
    let c = seq(50, 6);
    kv.allocate_slots(&mut t, &c, 0, 4).unwrap(); // takes the two empty blocks
    assert_eq!(kv.usage().evictions, 0);
    kv.allocate_slots(&mut t, &c, 4, 2).unwrap(); // evicts b's block, the least recently used
    assert_eq!(*t.block_ids().last().unwrap(), blk_b);
    assert_eq!(kv.pool().block_hash(blk_b), None);
    assert_eq!((probe(&mut kv, &a), probe(&mut kv, &b)), (2, 0));
    kv.check_invariants(&[&t]).unwrap();
    kv.free(t);
}

#[test]
fn a_colliding_hash_is_a_miss_not_a_wrong_block() {
    let mut kv = manager(8, 2, constant_hash);
    prefill_and_free(&mut kv, &[1, 2, 3, 4, 5]); // block [1, 2] takes hash 42; [3, 4] collides: not cached
    assert_eq!(kv.usage().cached_blocks, 1);
    assert_eq!(probe(&mut kv, &[1, 2, 3, 4, 5]), 2);
    assert_eq!(probe(&mut kv, &[3, 4, 9]), 0, "same hash, other tokens");
    assert_eq!(probe(&mut kv, &[1, 3, 9]), 0);
    kv.check_invariants(&[]).unwrap();
}

#[test]
fn a_hit_must_descend_from_the_previous_matched_block() {
    // parentless_hash: [2, 2] after [1, 1] and [2, 2] after [0, 0] get the same hash.
    let mut kv = manager(8, 2, parentless_hash);
    prefill_and_free(&mut kv, &[1, 1, 2, 2, 9]); // caches [1,1] (hash 1), [2,2] (hash 2)
    prefill_and_free(&mut kv, &[0, 0, 2, 2, 9]); // caches [0,0] (hash 0); its [2,2] collides: not cached
    assert_eq!(probe(&mut kv, &[1, 1, 2, 2, 9]), 4);
    assert_eq!(probe(&mut kv, &[0, 0, 2, 2, 9]), 2, "[2,2]'s tokens match, but its KV was computed after [1,1]");
    kv.check_invariants(&[]).unwrap();
}

#[test]
fn fork_shares_full_blocks_and_copies_the_partial_one() {
    let mut kv = default_manager(8, 4);
    let tokens = seq(0, 10);
    let (mut t, _) = kv.find_cached_prefix(&tokens);
    kv.allocate_slots(&mut t, &tokens, 0, 10).unwrap();
    let f = kv.fork(&t).unwrap();
    let copy = f.copy.unwrap();
    assert_eq!(copy.src, t.block_ids()[2]);
    assert_eq!(&f.table.block_ids()[..2], &t.block_ids()[..2]);
    assert_eq!(*f.table.block_ids().last().unwrap(), copy.dst);
    let ref_cnt = |b| kv.pool().ref_cnt(b);
    assert_eq!([ref_cnt(t.block_ids()[0]), ref_cnt(copy.src), ref_cnt(copy.dst)], [2, 1, 1]);
    kv.check_invariants(&[&t, &f.table]).unwrap();
    // Both branches decode different tokens into their own third block.
    let (mut ta, mut tb, mut tok_a, mut tok_b) = (t, f.table, tokens.clone(), tokens.clone());
    tok_a.extend([77, 78]);
    tok_b.extend([88, 89]);
    kv.allocate_slots(&mut ta, &tok_a, 10, 2).unwrap();
    kv.allocate_slots(&mut tb, &tok_b, 10, 2).unwrap();
    assert_ne!(ta.slot(11), tb.slot(11));
    assert_eq!(ta.slot(5), tb.slot(5));
    kv.cache_full_blocks(&mut ta, &tok_a, 12);
    kv.cache_full_blocks(&mut tb, &tok_b, 12);
    assert_eq!((ta.num_cached_blocks(), tb.num_cached_blocks()), (3, 3));
    kv.check_invariants(&[&ta, &tb]).unwrap();
    kv.free(ta);
    kv.free(tb);
    assert_eq!((probe(&mut kv, &tok_a), probe(&mut kv, &tok_b)), (8, 8));
    assert_eq!(kv.usage().used_blocks, 0);
}

/// `fork_prefix`: the first n tokens of a finished sequence, full blocks shared, the block holding the
/// rest copied; the fork appends after n, committing its own blocks.
#[test]
fn fork_prefix_shares_full_blocks_and_copies_the_one_holding_the_rest() {
    let mut kv = default_manager(16, 16);
    let tokens = seq(0, 40);
    let mut t = kv.new_table();
    kv.allocate_slots(&mut t, &tokens, 0, 40).unwrap();
    kv.cache_full_blocks(&mut t, &tokens, 40);
    for (n, shared, copied) in [(37, 2, true), (32, 2, false), (5, 0, true), (16, 1, false)] {
        let f = kv.fork_prefix(&t, n).unwrap();
        assert_eq!(f.table.num_tokens(), n);
        assert_eq!(f.table.num_cached_blocks(), shared);
        assert_eq!(&f.table.block_ids()[..shared], &t.block_ids()[..shared]);
        assert_eq!(f.copy.map(|c| c.src), copied.then(|| t.block_ids()[shared]));
        kv.check_invariants(&[&t, &f.table]).unwrap();
        // The fork continues with other tokens: its own blocks, cached after the shared ones.
        let mut mine = tokens[..n].to_vec();
        mine.extend(seq(1000, 30));
        let mut ft = f.table;
        kv.allocate_slots(&mut ft, &mine, n, 30).unwrap();
        kv.cache_full_blocks(&mut ft, &mine, n + 30);
        assert!(ft.block_ids()[shared..].iter().all(|b| !t.block_ids().contains(b)), "writes only its own blocks");
        kv.check_invariants(&[&t, &ft]).unwrap();
        kv.free(ft);
        assert_eq!(probe(&mut kv, &mine), (n + 30 - 1) / 16 * 16);
    }
    kv.free(t);
    kv.check_invariants(&[]).unwrap();
    assert_eq!(kv.usage().used_blocks, 0);
}

#[test]
fn slot_mapping_follows_the_block_table() {
    let mut kv = default_manager(8, 4);
    let tokens = seq(0, 9);
    let mut t = kv.new_table();
    kv.allocate_slots(&mut t, &tokens, 0, 9).unwrap();
    let mut slots = Vec::new();
    t.slot_mapping(0..9, &mut slots);
    for (pos, &slot) in slots.iter().enumerate() {
        assert_eq!(slot, t.block_ids()[pos / 4] as usize * 4 + pos % 4);
        assert_eq!(slot, pagellm::kv::slot_for(t.block_ids(), 4, pos));
    }
    kv.free(t);
}

#[test]
fn bad_configs_are_typed_errors() {
    use pagellm::kv::KvError;
    let cfg = KvCacheConfig::new(0);
    assert_eq!(KvCacheManager::new(cfg).err(), Some(KvError::NoBlocks));
    let cfg = KvCacheConfig { block_size: 0, ..KvCacheConfig::new(4) };
    assert!(KvCacheManager::new(cfg).err().unwrap().to_string().contains("block_size"));
}

// ---------------------------------------------------------------------------------------------------------
// Multi-turn chat: the conversation is re-rendered each turn; the cache turns that into "prefill the new
// tokens only".

/// One chat turn as the engine runs it: reuse the cached prefix, prefill the rest in chunks, decode
/// `reply_len` tokens (the last sampled one is never fed back), commit, free. Returns the conversation
/// (prompt + reply), the tokens computed, and the cached tokens found.
fn chat_turn(
    kv: &mut KvCacheManager,
    prompt: &[TokenId],
    reply_len: usize,
    rng: &mut StdRng,
) -> (Vec<TokenId>, usize, usize) {
    let mut tokens = prompt.to_vec();
    let (mut table, cached) = kv.find_cached_prefix(&tokens);
    let mut computed = cached;
    while computed < tokens.len() {
        let n = (tokens.len() - computed).min(37);
        kv.allocate_slots(&mut table, &tokens, computed, n).unwrap();
        computed += n;
    }
    for _ in 0..reply_len {
        tokens.push(rng.gen_range(0..32000));
        if tokens.len() - computed > 1 {
            kv.allocate_slots(&mut table, &tokens, computed, 1).unwrap();
            computed += 1;
        }
    }
    kv.cache_full_blocks(&mut table, &tokens, computed);
    kv.check_invariants(&[&table]).unwrap();
    kv.free(table);
    (tokens, computed, cached)
}

fn user_text(rng: &mut StdRng, len: usize) -> Vec<TokenId> {
    (0..len).map(|_| rng.gen_range(0..32000)).collect()
}

#[test]
fn conversation_reuses_every_full_block_of_the_previous_turn() {
    let bs = 16;
    let mut kv = default_manager(256, bs);
    let mut rng = StdRng::seed_from_u64(3);
    let system = user_text(&mut rng, 45);
    let mut history: Vec<TokenId> = system.clone();
    let mut prompts = Vec::new();
    let mut prev_computed = 0;
    for (turn, (user_len, reply_len)) in [(20, 33), (7, 16), (50, 5), (1, 64), (16, 17)].into_iter().enumerate() {
        history.extend(user_text(&mut rng, user_len));
        prompts.push(history.clone());
        let (conversation, computed, cached) = chat_turn(&mut kv, &history, reply_len, &mut rng);
        let expect = if turn == 0 { 0 } else { prev_computed / bs * bs };
        assert_eq!(cached, expect, "turn {turn}: every full block of the previous prompt + reply is reused");
        assert_eq!(computed, conversation.len() - 1);
        history = conversation;
        prev_computed = computed;
    }
    // A second user with the same system prompt reuses its full blocks.
    let mut other = system.clone();
    other.extend(user_text(&mut rng, 10));
    assert_eq!(chat_turn(&mut kv, &other, 3, &mut rng).2, 32);

    // Editing the first user message at token 60 keeps the cached blocks before that block.
    let mut edited = prompts[2].clone();
    edited[60] ^= 1;
    assert_eq!(probe(&mut kv, &edited), 48, "blocks 0..3 precede the change");
    let last = prompts.last().unwrap();
    assert_eq!(probe(&mut kv, last), (last.len() - 1) / bs * bs);
    let u = kv.usage();
    assert_eq!((u.used_blocks, u.evictions), (0, 0));
    assert!(u.prefix.hit_rate() > 0.5, "{:?}", u.prefix);
    kv.check_invariants(&[]).unwrap();
}
