//! SentencePiece tokenization exactly as llama.cpp's `llm_tokenizer_spm_session`, written here rather than
//! built from a `tokenizers` model, because no `tokenizers` model computes the same function:
//!
//! * llama.cpp starts from one symbol per UTF-8 character and repeatedly merges the adjacent pair whose
//!   concatenation is a vocab token with the highest *score* (ties: leftmost), whatever the two halves are.
//! * `tokenizers`' `Unigram` picks the Viterbi segmentation of highest total log-probability: a different
//!   segmentation on many strings. Its `BPE` needs explicit merges, which an SPM GGUF lacks; merges synthesised
//!   from scores still differ, because BPE sends a character missing from the vocab to byte fallback at once,
//!   while llama.cpp can still merge it with a neighbour into a vocab token.
//!
//! Input: one text fragment with spaces already escaped to `▁` (and the optional space prefix added) by the
//! caller. Cost: O(n log n) in the characters of the fragment, one hash lookup per candidate pair.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;
use super::TokenizerError;

/// A run of the text: `text[start..start + len]`, linked to its neighbours in the current segmentation.
/// `len == 0` marks a symbol merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` and its right neighbour `right`; `size` detects stale entries.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost (llama.cpp `llm_bigram_spm::comparator`).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}

/// Append the ids of `text` (already `▁`-escaped) to `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
    // One symbol per character.
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, ch)) in text.char_indices().enumerate() {
        let len = ch.len_utf8();
        let next = (start + len < text.len()).then_some(i + 1);
        symbols.push(Symbol { start, len, prev: i.checked_sub(1), next });
    }
    let mut queue = BinaryHeap::new();
    for i in 1..symbols.len() {
        try_add_bigram(vocab, text, &symbols, Some(i - 1), Some(i), &mut queue);
    }

    // Merge the best pair until no adjacent pair forms a token.
    while let Some(bigram) = queue.pop() {
        let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
        if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
            continue; // one side already merged elsewhere
        }
        symbols[bigram.left].len += right.len;
        symbols[bigram.right].len = 0;
        symbols[bigram.left].next = right.next;
        if let Some(next) = right.next {
            symbols[next].prev = Some(bigram.left);
        }
        try_add_bigram(vocab, text, &symbols, left.prev, Some(bigram.left), &mut queue);
        try_add_bigram(vocab, text, &symbols, Some(bigram.left), right.next, &mut queue);
    }

    // Emit the final symbols. A merged symbol is always a vocab token (it was only merged because it is);
    // a single character missing from the vocab falls back to its bytes. (llama.cpp's `rev_merge`
    // re-splitting is therefore never reached and is omitted.)
    let mut cursor = if symbols.is_empty() { None } else { Some(0) };
    while let Some(i) = cursor {
        let sym = symbols[i];
        let piece = &text[sym.start..sym.start + sym.len];
        match vocab.to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for &byte in piece.as_bytes() {
                    out.push(vocab.byte_to_token(byte).ok_or(TokenizerError::NoByteToken { byte })?);
                }
            }
        }
        cursor = sym.next;
    }
    Ok(())
}

fn try_add_bigram(
    vocab: &Vocab,
    text: &str,
    symbols: &[Symbol],
    left: Option<usize>,
    right: Option<usize>,
    queue: &mut BinaryHeap<Bigram>,
) {
    let (Some(left), Some(right)) = (left, right) else { return };
    let start = symbols[left].start;
    let size = symbols[left].len + symbols[right].len;
    if let Some(&id) = vocab.to_id.get(&text[start..start + size]) {
        queue.push(Bigram { left, right, score: vocab.scores[id as usize], size });
    }
}
