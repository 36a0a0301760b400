//! Reply text and scores for the scheduler: [`TextStream`] (streaming decoder + [`StopMatcher`]) turns a
//! sequence's token ids into the text it may release; [`log_softmax_pick`] gives a token's logprob and
//! the most likely alternatives from one row of logits; [`score`] does the same after the fact for a
//! whole reply (a pass of its own over prompt + reply).

use std::sync::Arc;

use crate::model::{Logits, Model, ModelError};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Each reply token's logprob and the `k` most likely tokens at its position, from one pass of the model
/// over prompt + reply in a session of its own (the engine's cache is not touched).
///
/// ```text
/// fed:     p0 .. p(n-1) | r0 r1 .. r(m-2)
/// rows:           ^last   ^    ^        ^      row i predicts r(i)
/// ```
pub fn score(model: &Model, prompt: &[u32], reply: &[u32], k: usize) -> Result<Vec<TokenScore>, ModelError> {
    const CHUNK: usize = 64;
    let Some((_, fed_reply)) = reply.split_last() else { return Ok(Vec::new()) };
    let n_vocab = model.config().n_vocab;
    let mut sess = model.new_session(prompt.len() + fed_reply.len())?;
    let mut rows = model.forward(&mut sess, prompt, Logits::Last)?;
    let mut out = Vec::with_capacity(reply.len());
    let mut chunks = fed_reply.chunks(CHUNK);
    loop {
        for row in rows.chunks_exact(n_vocab) {
            out.push(log_softmax_pick(row, reply[out.len()], k));
        }
        match chunks.next() {
            Some(c) => rows = model.forward(&mut sess, c, Logits::All)?,
            None => break,
        }
    }
    debug_assert_eq!(out.len(), reply.len());
    Ok(out)
}

/// A token's logprob and the most likely tokens at its position with theirs.
pub type TokenScore = (f32, Vec<(u32, f32)>);

/// ln softmax(row)\[id\], and the `k` largest entries of ln softmax(row) (ties by id).
pub fn log_softmax_pick(row: &[f32], id: u32, k: usize) -> TokenScore {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|i| (i, lp(row[i as usize]))).collect();
    }
    (row.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)), top)
}

/// Token ids in, reply text out: a streaming decoder followed by a [`StopMatcher`].
pub struct TextStream {
    decoder: StreamDecoder<Arc<Tokenizer>>,
    stops: StopMatcher,
}

impl TextStream {
    pub fn new(tok: Arc<Tokenizer>, stops: &[String]) -> TextStream {
        TextStream { decoder: StreamDecoder::new(tok), stops: StopMatcher::new(stops) }
    }

    /// Add a token; returns the text it releases and whether a stop string has now matched.
    pub fn push(&mut self, id: u32) -> (String, bool) {
        if self.stops.stopped {
            return (String::new(), true);
        }
        let piece = self.decoder.push(id);
        (self.stops.push(&piece, false), self.stops.stopped)
    }

    /// End of the reply: the rest of the text (nothing after a stop string).
    pub fn finish(&mut self) -> String {
        if self.stops.stopped {
            return String::new();
        }
        let tail = self.decoder.flush();
        self.stops.push(&tail, true)
    }

    pub fn stopped(&self) -> bool {
        self.stops.stopped
    }
}

/// Holds back text that may be the start of a stop string, and cuts the text at the first match.
///
/// ```text
/// pending: "...Hello, Us"   stop "User:"  -> release "...Hello, ", keep "Us" (a prefix of "User:")
/// pending: "Us" + "er: x"   contains "User:" at 0 -> release "", stopped
/// ```
/// Why this is enough: `pending` only ever keeps its longest suffix that is a prefix of some stop
/// string, so a match can never begin in text already released.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        StopMatcher { stops, pending: String::new(), stopped: false }
    }

    /// Add `text`; returns what may be shown now. `at_end`: no more text comes, release all before a match.
    pub fn push(&mut self, text: &str, at_end: bool) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        let first_match = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_match {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let keep = if at_end { 0 } else { self.partial_stop_len() };
        let rest = self.pending.split_off(self.pending.len() - keep);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Bytes of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            // Suffixes shorter than `s`, starting at character boundaries.
            for (at, _) in p.char_indices().rev().take(s.chars().count().saturating_sub(1)) {
                let suffix = &p[at..];
                if suffix.len() > best && s.starts_with(suffix) {
                    best = suffix.len();
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::{log_softmax_pick, StopMatcher};

    /// Feed `pieces` one by one; returns the released text and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p, false);
        }
        out += &m.push("", true);
        (out, m.stopped)
    }

    #[test]
    fn stop_strings_match_across_pieces_and_are_cut() {
        assert_eq!(run(&["User:"], &["Hello, Us", "er: more"]), ("Hello, ".into(), true));
        assert_eq!(run(&["User:"], &["Hello, Us", "es"]), ("Hello, Uses".into(), false));
        assert_eq!(run(&["\n\n", "END"], &["a\n", "b E", "N", "D\n\n"]), ("a\nb ".into(), true));
        assert_eq!(run(&["ab"], &["xa", "a", "b"]), ("xa".into(), true));
        assert_eq!(run(&[], &["free ", "text"]), ("free text".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&[""], &["x"]), ("x".into(), false));
    }

    #[test]
    fn held_text_is_released_once_ruled_out() {
        let mut m = StopMatcher::new(&["###".to_string()]);
        assert_eq!(m.push("a ##", false), "a ");
        assert_eq!(m.push("x", false), "##x");
        assert!(!m.stopped);
    }

    #[test]
    fn log_softmax_pick_matches_softmax() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = log_softmax_pick(&row, 2, 3);
        let p = crate::sampling::softmax(&row);
        assert!((lp - p[2].ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((top[0].1 - p[1].ln()).abs() < 1e-5);
        assert!(log_softmax_pick(&row, 9, 0).0.is_infinite());
    }
}
