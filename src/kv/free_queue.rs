//! The free block queue: an index-linked doubly linked list over block ids.
//!
//! `prev[b]`/`next[b]` link block `b` to its neighbours (`NIL` at the ends); membership is a flag, so
//! `push_front`, `push_back`, `pop_front`, `remove` (unlink from the middle) and `contains` are O(1) and
//! never allocate. The pool decides what goes where (see the order in `kv`'s module doc).

use super::BlockId;

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub(crate) struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    queued: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// A queue holding every block, in id order (block 0 at the front).
    pub(crate) fn full(num_blocks: usize) -> Self {
        debug_assert!(num_blocks < NIL as usize);
        let mut q = FreeQueue {
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            queued: vec![false; num_blocks],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for b in 0..num_blocks as BlockId {
            q.push_back(b);
        }
        q
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, b: BlockId) -> bool {
        self.queued[b as usize]
    }

    pub(crate) fn push_back(&mut self, b: BlockId) {
        debug_assert!(!self.contains(b), "block {b} queued twice");
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.queued[i] = true;
        self.len += 1;
    }

    pub(crate) fn push_front(&mut self, b: BlockId) {
        debug_assert!(!self.contains(b), "block {b} queued twice");
        let i = b as usize;
        self.prev[i] = NIL;
        self.next[i] = self.head;
        match self.head {
            NIL => self.tail = b,
            h => self.prev[h as usize] = b,
        }
        self.head = b;
        self.queued[i] = true;
        self.len += 1;
    }

    pub(crate) fn front(&self) -> Option<BlockId> {
        (self.head != NIL).then_some(self.head)
    }

    pub(crate) fn pop_front(&mut self) -> Option<BlockId> {
        let b = self.front()?;
        self.remove(b);
        Some(b)
    }

    /// Unlinks `b` wherever it is. `b` must be queued.
    pub(crate) fn remove(&mut self, b: BlockId) {
        debug_assert!(self.contains(b), "block {b} is not in the free queue");
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.queued[i] = false;
        self.len -= 1;
    }

    /// Front to back.
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let b = cur;
                cur = self.next[b as usize];
                b
            })
        })
    }

    /// Links are mutual, the walk from `head` ends at `tail` after exactly `len` steps (no cycle), and the
    /// membership flags name exactly the blocks on the walk.
    pub(crate) fn check(&self) -> Result<(), String> {
        let n = self.prev.len();
        let (mut cur, mut prev, mut steps) = (self.head, NIL, 0usize);
        while cur != NIL {
            if cur as usize >= n || steps >= n {
                return Err(format!("free queue walk broken at block {cur} after {steps} steps"));
            }
            if self.prev[cur as usize] != prev {
                return Err(format!("free queue: prev[{cur}] = {} but came from {prev}", self.prev[cur as usize]));
            }
            if !self.queued[cur as usize] {
                return Err(format!("free queue: block {cur} is linked but not flagged as queued"));
            }
            prev = cur;
            cur = self.next[cur as usize];
            steps += 1;
        }
        if prev != self.tail {
            return Err(format!("free queue: walk ends at {prev}, tail is {}", self.tail));
        }
        let flagged = self.queued.iter().filter(|&&q| q).count();
        if steps != self.len || flagged != self.len {
            return Err(format!("free queue: len {} but walk {steps} and {flagged} flags", self.len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &FreeQueue) -> Vec<BlockId> {
        q.iter().collect()
    }

    #[test]
    fn push_pop_remove_keep_links() {
        let mut q = FreeQueue::full(5);
        assert_eq!(order(&q), [0, 1, 2, 3, 4]);
        q.remove(2);
        q.remove(0);
        q.remove(4);
        assert_eq!(order(&q), [1, 3]);
        q.check().unwrap();
        q.push_back(0);
        q.push_front(4);
        assert_eq!(order(&q), [4, 1, 3, 0]);
        assert_eq!(q.pop_front(), Some(4));
        q.remove(0);
        q.remove(1);
        q.remove(3);
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.len(), 0);
        q.check().unwrap();
        q.push_front(2);
        assert_eq!(order(&q), [2]);
        q.check().unwrap();
    }

    #[test]
    fn matches_a_vecdeque_under_random_ops() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 32;
        let mut q = FreeQueue::full(n);
        let mut model: std::collections::VecDeque<BlockId> = (0..n as BlockId).collect();
        for _ in 0..20_000 {
            let b = rng.gen_range(0..n as BlockId);
            match (q.contains(b), rng.gen_range(0..3)) {
                (true, 0) => {
                    assert_eq!(q.pop_front(), model.pop_front());
                }
                (true, _) => {
                    q.remove(b);
                    model.retain(|&x| x != b);
                }
                (false, 0) => {
                    q.push_front(b);
                    model.push_front(b);
                }
                (false, _) => {
                    q.push_back(b);
                    model.push_back(b);
                }
            }
            q.check().unwrap();
            assert!(order(&q).iter().eq(model.iter()));
        }
    }
}
