//! Ids back to bytes, as llama.cpp `token_to_piece` and `detokenize`, and a streaming decoder that gives
//! the same text as decoding everything at once.
//!
//! A piece is what one token renders to: control/user-defined/unknown tokens their text, normal SPM tokens
//! their text with `▁` -> space, normal BPE tokens their GPT-2 byte characters mapped back to bytes, byte
//! tokens (`<0xAB>`) one byte. With `special = false`, control and unknown tokens render to nothing.
//! `detokenize` concatenates pieces, strips the first piece's leading space where the vocab adds one
//! (`add_space_prefix`), and for some BPE vocabs applies llama.cpp's `clean_spaces` (" ," -> ",").

use std::ops::Deref;

use super::vocab::{attr, Vocab, VocabKind};
use super::Tokenizer;

/// GPT-2's byte -> printable character map (`bytes_to_unicode`): printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100.. in byte order.
pub(crate) fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("U+0100..U+0143 are chars")
}

/// The inverse of [`byte_to_unicode`], as a table indexed by code point (U+0000..U+0143).
fn unicode_to_byte_table() -> [Option<u8>; 0x144] {
    let mut table = [None; 0x144];
    for b in 0..=255u8 {
        table[byte_to_unicode(b) as usize] = Some(b);
    }
    table
}

/// llama.cpp `llama_decode_text`: byte-level characters back to bytes; a character outside the map is
/// written as `[UNK_BYTE_0x<its utf-8 hex><the whole text>]`, as llama.cpp does.
fn decode_byte_level(text: &str, table: &[Option<u8>; 0x144]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for ch in text.chars() {
        match table.get(ch as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in ch.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// The byte of a byte token `<0xAB>` (llama.cpp: `strtol(text.substr(3, 2), 16)`).
fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..text.len().min(5)).unwrap_or(&[]);
    let mut v = 0u8;
    for &d in digits {
        match (d as char).to_digit(16) {
            Some(x) => v = v.wrapping_mul(16).wrapping_add(x as u8),
            None => break,
        }
    }
    v
}

/// Every token's piece with `special = true` (llama.cpp's `cache_token_to_piece`), stored flat:
/// piece `id` is `bytes[offsets[id]..offsets[id + 1]]`.
pub(crate) struct Pieces {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl Pieces {
    pub fn build(vocab: &Vocab) -> Pieces {
        let table = unicode_to_byte_table();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(vocab.n_vocab() + 1);
        offsets.push(0);
        for (id, text) in vocab.texts.iter().enumerate() {
            let a = vocab.attrs[id];
            if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
                bytes.extend_from_slice(text.as_bytes());
            } else if a & attr::NORMAL != 0 {
                match vocab.kind {
                    VocabKind::Spm => bytes.extend_from_slice(text.replace('▁', " ").as_bytes()),
                    VocabKind::Bpe => bytes.extend_from_slice(&decode_byte_level(text, &table)),
                }
            } else if a & attr::BYTE != 0 {
                bytes.push(byte_token_value(text));
            } // unused / undefined tokens render to nothing
            offsets.push(bytes.len() as u32);
        }
        Pieces { bytes, offsets }
    }

    /// The piece of `id`; empty for control/unknown tokens unless `special`, and for ids out of range.
    pub fn get<'a>(&'a self, vocab: &Vocab, id: u32, special: bool) -> &'a [u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() || (!special && vocab.attr(id) & (attr::UNKNOWN | attr::CONTROL) != 0) {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// llama.cpp `detokenize` (remove_special, unparse_special) on raw bytes.
pub(crate) fn detokenize(tok: &Tokenizer, mut ids: &[u32], remove_special: bool, unparse_special: bool) -> Vec<u8> {
    let vocab = &tok.vocab;
    let mut remove_space = vocab.add_space_prefix;
    if remove_special && vocab.add_bos && !ids.is_empty() && Some(ids[0]) == vocab.ids.bos {
        remove_space = false;
        ids = &ids[1..];
    }
    if remove_special && vocab.add_eos && !ids.is_empty() && Some(ids[ids.len() - 1]) == vocab.ids.eos {
        ids = &ids[..ids.len() - 1];
    }
    let mut out = Vec::new();
    for &id in ids {
        let piece = tok.pieces.get(vocab, id, unparse_special);
        out.extend_from_slice(lstrip_one(piece, remove_space));
        remove_space = false;
    }
    if vocab.clean_spaces {
        clean_spaces(&mut out);
    }
    out
}

fn lstrip_one(piece: &[u8], strip: bool) -> &[u8] {
    match piece {
        [b' ', rest @ ..] if strip => rest,
        _ => piece,
    }
}

/// llama.cpp's three clean-up passes, in place and index for index as written there:
/// 1. drop a space before `? ! . ,`;  2. `a ' b` -> `a'b`;  3. drop a space before `'s 'm 're 've`.
pub(crate) fn clean_spaces(text: &mut Vec<u8>) {
    // Pass 1.
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);

    // Pass 2: the space after the apostrophe is overwritten with NUL and skipped.
    let n = text.len();
    let mut total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    text.truncate(total);

    // Pass 3.
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = text[i + 1];
            if matches!(x1, b's' | b'm') || (i + 2 < n && matches!((x1, text[i + 2]), (b'r', b'e') | (b'v', b'e'))) {
                total -= 1;
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

/// Whether `clean_spaces(a ++ b) == clean_spaces(a) ++ clean_spaces(b)` for every `b`, given that `a`
/// ends with `last`. Each pass only looks one byte left of a position and at most two right of an
/// apostrophe; a boundary after a byte that is not a space, an apostrophe, `r` or `v` (the middle of
/// `'re` / `'ve`) is outside every pattern. (Checked against whole-text cleaning in the unit tests.)
fn is_clean_cut(last: u8) -> bool {
    !matches!(last, b' ' | b'\'' | b'r' | b'v')
}

/// Streaming detokenizer: `push` one id at a time and get the text that is final so far.
///
/// The text returned by all `push` calls plus `flush` equals `Tokenizer::decode` of the same ids (or
/// `detokenize(.., false, true)` with [`StreamDecoder::with_special`]). A character split across tokens
/// (byte fallback, byte-level BPE) is held until its last byte arrives; bytes that can never form a
/// character become U+FFFD exactly where `String::from_utf8_lossy` would put them. With `clean_spaces`
/// vocabs, text after a space or apostrophe is held until the next token decides it.
///
/// `T` is `&Tokenizer`, `Arc<Tokenizer>` or anything else that derefs to a [`Tokenizer`].
pub struct StreamDecoder<T: Deref<Target = Tokenizer>> {
    tok: T,
    special: bool,
    first: bool,
    /// Raw bytes not yet cleaned (only with `clean_spaces`).
    tail: Vec<u8>,
    /// Final bytes waiting for the rest of a UTF-8 character.
    utf8: Vec<u8>,
}

/// The name other modules may know it by.
pub type Decoder<T> = StreamDecoder<T>;

impl<T: Deref<Target = Tokenizer>> StreamDecoder<T> {
    pub fn new(tok: T) -> Self {
        StreamDecoder { tok, special: false, first: true, tail: Vec::new(), utf8: Vec::new() }
    }

    /// Render control tokens as their text (llama.cpp `unparse_special`); off by default, like `decode`.
    pub fn with_special(mut self, special: bool) -> Self {
        self.special = special;
        self
    }

    /// Add one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let tok = &*self.tok;
        let piece = tok.pieces.get(&tok.vocab, id, self.special);
        let piece = lstrip_one(piece, self.first && tok.vocab.add_space_prefix);
        self.first = false;
        if !tok.vocab.clean_spaces {
            self.utf8.extend_from_slice(piece);
        } else {
            self.tail.extend_from_slice(piece);
            if self.tail.last().is_some_and(|&b| is_clean_cut(b)) {
                let mut done = std::mem::take(&mut self.tail);
                clean_spaces(&mut done);
                self.utf8.extend_from_slice(&done);
            }
        }
        self.take_text(false)
    }

    /// End of stream: everything still held, with an unfinished character as U+FFFD.
    pub fn flush(&mut self) -> String {
        let mut done = std::mem::take(&mut self.tail);
        clean_spaces(&mut done);
        self.utf8.extend_from_slice(&done);
        self.first = true;
        self.take_text(true)
    }

    /// Move the decodable prefix of `utf8` out, keeping an incomplete last character unless `at_end`.
    fn take_text(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        let mut pos = 0;
        while pos < self.utf8.len() {
            match std::str::from_utf8(&self.utf8[pos..]) {
                Ok(s) => {
                    out.push_str(s);
                    pos = self.utf8.len();
                }
                Err(e) => {
                    let good = pos + e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.utf8[pos..good]).expect("valid prefix"));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos = good + bad;
                        }
                        None if at_end => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            pos = self.utf8.len();
                        }
                        None => {
                            pos = good;
                            break;
                        }
                    }
                }
            }
        }
        self.utf8.drain(..pos);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_is_gpt2s() {
        assert_eq!(byte_to_unicode(b'!'), '!');
        assert_eq!(byte_to_unicode(b' '), 'Ġ');
        assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
        assert_eq!(byte_to_unicode(0), '\u{100}');
        assert_eq!(byte_to_unicode(0xad), '\u{143}');
        let table = unicode_to_byte_table();
        assert!((0..=255u8).all(|b| table[byte_to_unicode(b) as usize] == Some(b)));
    }

    #[test]
    fn clean_spaces_examples() {
        let clean = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it ' s"), "it's");
        assert_eq!(clean("it 's we 're they 'll I 'd"), "it's we're they 'll I 'd");
        assert_eq!(clean(" ?"), "?");
        assert_eq!(clean(""), "");
    }

    /// Streaming clean-up equals whole-text clean-up for every split of random strings made of the
    /// characters the passes look at.
    #[test]
    fn clean_cut_rule_holds() {
        let alphabet = b" 'smrvetdl?.x";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (rand() % 12) as usize;
            let text: Vec<u8> = (0..len).map(|_| alphabet[(rand() % alphabet.len() as u64) as usize]).collect();
            let mut whole = text.clone();
            clean_spaces(&mut whole);
            // Cut at every allowed boundary, as the stream decoder does after each byte.
            let mut streamed = Vec::new();
            let mut tail = Vec::new();
            for &b in &text {
                tail.push(b);
                if is_clean_cut(b) {
                    clean_spaces(&mut tail);
                    streamed.append(&mut tail);
                }
            }
            clean_spaces(&mut tail);
            streamed.append(&mut tail);
            assert_eq!(streamed, whole, "text {:?}", String::from_utf8_lossy(&text));
        }
    }
}
