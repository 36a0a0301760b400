//! `response_format: {"type": "json_object"}`: a byte-level JSON prefix automaton ([`JsonState`]) and a
//! per-vocabulary token mask ([`JsonMask`]) that keep a reply a valid prefix of one JSON object.
//!
//! Contract: a reply sampled only from tokens the mask allows is, at every step, a prefix of some valid
//! JSON object (leading whitespace, then `{ ... }`), and every such prefix can still be completed (each
//! accepted state has a next byte, and byte-level / byte-fallback vocabularies have every byte as a
//! token). Once the object closes, [`JsonState::is_complete`] holds, no byte is accepted any more, and
//! the mask allows only end-of-generation tokens. The text is what serde_json parses: strings are valid
//! UTF-8 (checked byte by byte, so a token may end inside a character), `\u` escapes pair surrogates.
//!
//! Caps, so that a hostile or looping model cannot grow memory or stall on filler (each is a
//! "no" on the byte that would pass it, never a dead end):
//! - nesting depth [`MAX_DEPTH`] (the stack is one `u64` bit per level, so the state is `Copy`);
//! - [`MAX_WS_RUN`] consecutive whitespace bytes outside strings;
//! - a number has at most [`MAX_NUMBER_BYTES`] bytes and a two-digit exponent, so every number fits
//!   an f64 (serde_json refuses `1e400`).
//!
//! Cost of a mask: one pass over the vocabulary per step. Tokens whose first byte the state refuses are
//! skipped at once (a 256-entry table per step), and inside a string a token of plain string text
//! (valid UTF-8, no `"`, `\` or control byte) is allowed without feeding it; the rest are fed to a copy
//! of the state, a few bytes each.

use std::sync::Arc;

use crate::sampling::argmax;
use crate::tokenizer::Tokenizer;

/// Most nested objects and arrays.
pub const MAX_DEPTH: usize = 64;

/// Most consecutive whitespace bytes outside strings.
pub const MAX_WS_RUN: u8 = 32;

/// Most bytes in one number (sign, digits, dot, exponent).
pub const MAX_NUMBER_BYTES: u8 = 32;

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where a prefix of one JSON object stands; feed it bytes. `Copy`: trying a token costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonState {
    mode: Mode,
    /// Bit `i`: container `i` (0 = outermost) is an object, else an array.
    stack: u64,
    depth: u8,
    /// Whitespace bytes since the last other byte (outside strings).
    ws_run: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `:`, or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After a value inside a container: `,` or the container's closing bracket.
    AfterValue,
    Str { key: bool, at: StrAt },
    Num { at: NumAt, len: u8 },
    /// Inside `true` / `false` / `null` ([`LITERALS`]`[lit]`), `pos` bytes matched.
    Lit { lit: u8, pos: u8 },
    /// The top-level object is closed: nothing may follow.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StrAt {
    /// Between characters.
    Plain,
    /// After `\`.
    Escape,
    /// In `\uXXXX`: `left` hex digits to go, `val` the digits so far; `low`: the second half of a
    /// surrogate pair (must be DC00..DFFF).
    Hex { left: u8, val: u16, low: bool },
    /// After a high surrogate `\uD8xx`: its low half must follow, `\` then `u`.
    PairBackslash,
    PairU,
    /// Inside a multi-byte UTF-8 character: `left` continuation bytes to go, the next in `lo..=hi`.
    Utf8 { left: u8, lo: u8, hi: u8 },
}

/// The JSON number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumAt {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    /// Exponent digits so far (1 or 2).
    ExpInt(u8),
}

impl NumAt {
    /// Whether the number may end here.
    fn can_end(self) -> bool {
        matches!(self, NumAt::Zero | NumAt::Int | NumAt::Frac | NumAt::ExpInt(_))
    }

    fn next(self, b: u8) -> Option<NumAt> {
        use NumAt::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => Exp,
            (Exp, b'+' | b'-') => ExpSign,
            (Exp | ExpSign, b'0'..=b'9') => ExpInt(1),
            (ExpInt(1), b'0'..=b'9') => ExpInt(2),
            _ => return None,
        })
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState::new()
    }
}

impl JsonState {
    /// Nothing read yet.
    pub fn new() -> JsonState {
        JsonState { mode: Mode::Start, stack: 0, depth: 0, ws_run: 0 }
    }

    /// Reads `bytes`; `false` (and the state unchanged) when they do not continue a valid prefix.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut s = *self;
        if !bytes.iter().all(|&b| s.step(b)) {
            return false;
        }
        *self = s;
        true
    }

    /// Whether `bytes` would continue a valid prefix; the state is not changed.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut s = *self;
        bytes.iter().all(|&b| s.step(b))
    }

    /// The top-level object is closed.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Between characters of a string: any text without `"`, `\` or control bytes continues it.
    fn in_plain_string(&self) -> bool {
        matches!(self.mode, Mode::Str { at: StrAt::Plain, .. })
    }

    fn top_is_object(&self) -> bool {
        self.depth > 0 && self.stack >> (self.depth - 1) & 1 == 1
    }

    /// One byte; on `false` the state is garbage (`feed` works on a copy).
    fn step(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key, at } => return self.string_byte(key, at, b),
            Mode::Lit { lit, pos } => {
                let word = LITERALS[lit as usize];
                if word[pos as usize] != b {
                    return false;
                }
                let pos = pos + 1;
                self.mode = if pos as usize == word.len() { Mode::AfterValue } else { Mode::Lit { lit, pos } };
                return true;
            }
            Mode::Num { at, len } => {
                if let Some(next) = at.next(b) {
                    // A byte that leaves the number unfinished needs room for one more after it.
                    let need = len + 1 + u8::from(!next.can_end());
                    if need > MAX_NUMBER_BYTES {
                        return false;
                    }
                    self.mode = Mode::Num { at: next, len: len + 1 };
                    return true;
                }
                if !at.can_end() {
                    return false;
                }
                // The number ended; `b` is structure, read below.
                self.mode = Mode::AfterValue;
            }
            _ => {}
        }
        if is_ws(b) {
            if self.mode == Mode::Done || self.ws_run >= MAX_WS_RUN {
                return false;
            }
            self.ws_run += 1;
            return true;
        }
        self.ws_run = 0;
        match (self.mode, b) {
            (Mode::Start, b'{') => self.open(true),
            (Mode::ObjectFirst | Mode::AfterValue, b'}') if self.top_is_object() => self.close(),
            (Mode::ArrayFirst | Mode::AfterValue, b']') if !self.top_is_object() => self.close(),
            (Mode::ObjectFirst | Mode::Key, b'"') => {
                self.mode = Mode::Str { key: true, at: StrAt::Plain };
                true
            }
            (Mode::Colon, b':') => {
                self.mode = Mode::Value;
                true
            }
            (Mode::AfterValue, b',') => {
                self.mode = if self.top_is_object() { Mode::Key } else { Mode::Value };
                true
            }
            (Mode::Value | Mode::ArrayFirst, _) => self.value_start(b),
            _ => false,
        }
    }

    fn value_start(&mut self, b: u8) -> bool {
        self.mode = match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b'"' => Mode::Str { key: false, at: StrAt::Plain },
            b'-' => Mode::Num { at: NumAt::Minus, len: 1 },
            b'0' => Mode::Num { at: NumAt::Zero, len: 1 },
            b'1'..=b'9' => Mode::Num { at: NumAt::Int, len: 1 },
            b't' => Mode::Lit { lit: 0, pos: 1 },
            b'f' => Mode::Lit { lit: 1, pos: 1 },
            b'n' => Mode::Lit { lit: 2, pos: 1 },
            _ => return false,
        };
        true
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth as usize >= MAX_DEPTH {
            return false;
        }
        self.stack = self.stack & !(1 << self.depth) | (u64::from(object) << self.depth);
        self.depth += 1;
        self.mode = if object { Mode::ObjectFirst } else { Mode::ArrayFirst };
        true
    }

    fn close(&mut self) -> bool {
        self.depth -= 1;
        self.mode = if self.depth == 0 { Mode::Done } else { Mode::AfterValue };
        true
    }

    fn string_byte(&mut self, key: bool, at: StrAt, b: u8) -> bool {
        let at = match (at, b) {
            (StrAt::Plain, b'"') => {
                self.mode = if key { Mode::Colon } else { Mode::AfterValue };
                return true;
            }
            (StrAt::Plain, b'\\') => StrAt::Escape,
            (StrAt::Plain, 0x00..=0x1f) => return false,
            (StrAt::Plain, 0x20..=0x7f) => StrAt::Plain,
            (StrAt::Plain, _) => match utf8_lead(b) {
                Some(at) => at,
                None => return false,
            },
            (StrAt::Utf8 { left, lo, hi }, _) if (lo..=hi).contains(&b) => {
                if left == 1 {
                    StrAt::Plain
                } else {
                    StrAt::Utf8 { left: left - 1, lo: 0x80, hi: 0xbf }
                }
            }
            (StrAt::Escape, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => StrAt::Plain,
            (StrAt::Escape, b'u') => StrAt::Hex { left: 4, val: 0, low: false },
            (StrAt::PairBackslash, b'\\') => StrAt::PairU,
            (StrAt::PairU, b'u') => StrAt::Hex { left: 4, val: 0, low: true },
            (StrAt::Hex { left, val, low }, _) => {
                let Some(d) = (b as char).to_digit(16) else { return false };
                let (left, val) = (left - 1, val << 4 | d as u16);
                // Checked as soon as the leading digits decide it: a low half where none may be, or
                // anything else where one must be, would leave no valid way on.
                let ok = match (left, low) {
                    (3, true) => val == 0xd,
                    (2, true) => (0xdc..=0xdf).contains(&val),
                    (2, false) => !(0xdc..=0xdf).contains(&val),
                    _ => true,
                };
                if !ok {
                    return false;
                }
                match left {
                    0 if !low && (0xd800..=0xdbff).contains(&val) => StrAt::PairBackslash,
                    0 => StrAt::Plain,
                    _ => StrAt::Hex { left, val, low },
                }
            }
            _ => return false,
        };
        self.mode = Mode::Str { key, at };
        true
    }
}

/// The state after a UTF-8 lead byte: continuation bytes to go and the range of the next one (which
/// rules out overlong forms, surrogates and code points past U+10FFFF).
fn utf8_lead(b: u8) -> Option<StrAt> {
    let (left, lo, hi) = match b {
        0xc2..=0xdf => (1, 0x80, 0xbf),
        0xe0 => (2, 0xa0, 0xbf),
        0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
        0xed => (2, 0x80, 0x9f),
        0xf0 => (3, 0x90, 0xbf),
        0xf1..=0xf3 => (3, 0x80, 0xbf),
        0xf4 => (3, 0x80, 0x8f),
        _ => return None,
    };
    Some(StrAt::Utf8 { left, lo, hi })
}

/// Each token's bytes, built once per vocabulary; [`JsonMask::apply`] masks a row of logits.
pub struct JsonMask {
    /// Token `id`'s bytes are `bytes[offsets[id]..offsets[id + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Valid UTF-8 with no `"`, `\` or control byte: always allowed between characters of a string.
    plain: Vec<bool>,
    eog: Vec<bool>,
}

impl JsonMask {
    /// `pieces[id]`: the bytes token `id` adds to the text (empty for control tokens, which are never
    /// allowed); `eog`: the end-of-generation ids, allowed exactly when the object is complete.
    pub fn new<'a>(pieces: impl IntoIterator<Item = &'a [u8]>, eog: &[u32]) -> JsonMask {
        let mut bytes = Vec::new();
        let mut offsets = vec![0u32];
        let mut plain = Vec::new();
        for p in pieces {
            bytes.extend_from_slice(p);
            offsets.push(bytes.len() as u32);
            plain.push(std::str::from_utf8(p).is_ok_and(|s| s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')));
        }
        let mut is_eog = vec![false; plain.len()];
        for &id in eog {
            if let Some(e) = is_eog.get_mut(id as usize) {
                *e = true;
            }
        }
        JsonMask { bytes, offsets, plain, eog: is_eog }
    }

    /// The mask for `tok`'s vocabulary: each token as the reply's decoder renders it (control tokens as
    /// nothing). The decoder's clean-ups (a stripped leading space, llama.cpp's `clean_spaces`) only ever
    /// drop a space outside a string or before `? ! . , '`, so the text stays valid JSON.
    pub fn for_tokenizer(tok: &Tokenizer, eog: &[u32]) -> JsonMask {
        JsonMask::new((0..tok.n_vocab() as u32).map(|id| tok.piece(id, false)), eog)
    }

    pub fn n_vocab(&self) -> usize {
        self.plain.len()
    }

    fn piece(&self, id: usize) -> &[u8] {
        &self.bytes[self.offsets[id] as usize..self.offsets[id + 1] as usize]
    }

    /// Whether token `id` may follow `state`.
    pub fn allows(&self, state: &JsonState, id: u32) -> bool {
        let id = id as usize;
        if id >= self.n_vocab() {
            return false;
        }
        if self.eog[id] {
            return state.is_complete();
        }
        let p = self.piece(id);
        !p.is_empty() && state.accepts(p)
    }

    /// Sets to -inf the logits of every token that may not follow `state` (ids past the vocabulary
    /// included); returns how many remain.
    pub fn apply(&self, state: &JsonState, logits: &mut [f32]) -> usize {
        let mut first = [false; 256];
        for (b, ok) in first.iter_mut().enumerate() {
            *ok = state.accepts(&[b as u8]);
        }
        let plain_ok = state.in_plain_string();
        let complete = state.is_complete();
        let mut allowed = 0;
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = id < self.n_vocab() && {
                let p = self.piece(id);
                if self.eog[id] {
                    complete
                } else if p.is_empty() || !first[p[0] as usize] {
                    false
                } else {
                    (plain_ok && self.plain[id]) || state.accepts(p)
                }
            };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        allowed
    }
}

/// One reply's constraint: the vocabulary's shared mask and the reply's state so far.
#[derive(Clone)]
pub struct JsonGuide {
    mask: Arc<JsonMask>,
    state: JsonState,
}

impl JsonGuide {
    pub fn new(mask: Arc<JsonMask>) -> JsonGuide {
        JsonGuide { mask, state: JsonState::new() }
    }

    /// Masks `logits`, then lets `sample` pick from them; `None` when no token is allowed (a vocabulary
    /// that cannot spell some byte). Why the pick is checked: a sampler may fall back to its last
    /// candidate when rounding leaves the cumulative probability short, and that one may be masked; the
    /// best allowed token is taken instead.
    pub fn sample(&self, logits: &mut [f32], sample: impl FnOnce(&mut [f32]) -> u32) -> Option<u32> {
        if self.mask.apply(&self.state, logits) == 0 {
            return None;
        }
        let id = sample(logits);
        Some(if self.mask.allows(&self.state, id) { id } else { argmax(logits) })
    }

    /// Reads the sampled token `id`; returns whether the object is now complete.
    pub fn accept(&mut self, id: u32) -> bool {
        let fed = self.mask.allows(&self.state, id) && (self.mask.eog[id as usize] || self.state.feed(self.mask.piece(id as usize)));
        debug_assert!(fed, "token {id} was not allowed");
        self.state.is_complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    fn accepts(s: &str) -> bool {
        JsonState::new().feed(s.as_bytes())
    }

    fn complete(s: &str) -> bool {
        let mut st = JsonState::new();
        st.feed(s.as_bytes()) && st.is_complete()
    }

    #[test]
    fn prefixes_and_objects() {
        for s in ["", "  \n", "{", "{\"", "{\"a", "{\"a\"", "{\"a\":", "{\"a\": [1, 2", "{\"a\": {\"b\": tr", "{\"a\":-", "{\"a\":-0.5e+"] {
            assert!(accepts(s) && !complete(s), "{s:?}");
        }
        for s in [
            "{}",
            " \n{ }",
            "{\"a\":1}",
            "{\"a\": [1, -0.5e+3, 0, 2E9, 1.25], \"b\": {\"c\": [true, false, null, []]}, \"d\": \"\"}",
            r#"{"e": "q\"\\\/\b\f\n\r\t \u00e9 \uD83D\uDE00 é 😀"}"#,
        ] {
            assert!(complete(s), "{s:?}");
            assert!(serde_json::from_str::<Value>(s).unwrap().is_object());
        }
        for s in [
            "[", "1", "\"a\"", "x", "{a", "{\"a\" 1", "{\"a\":01", "{\"a\":1.}", "{\"a\":.5", "{\"a\":1e}", "{\"a\":-}",
            "{\"a\":+1", "{\"a\":tru}", "{\"a\":nul ", "{,", "{\"a\":1,}", "{\"a\":[1,]", "{\"a\":[1}", "{\"a\":{]",
            "{}}", "{} ", "{}x", "{\"\n", "{\"\\x", "{\"\\u12g", "{\"\\uDC00", "{\"\\uD800x", "{\"\\uD800\\u0041",
        ] {
            assert!(!accepts(s), "{s:?}");
        }
    }

    #[test]
    fn utf8_is_checked_byte_by_byte() {
        let mut st = JsonState::new();
        assert!(st.feed(b"{\"a\":\"\xe2"));
        assert!(!st.accepts(b"\""), "a character cut short");
        assert!(st.feed(b"\x82") && st.feed(b"\xac\"}") && st.is_complete());
        for bad in [&b"{\"\xc0\x80"[..], b"{\"\xed\xa0\x80", b"{\"\xf5", b"{\"\x80", b"{\"\xe0\x80"] {
            assert!(!JsonState::new().feed(bad), "{bad:?}");
        }
        assert!(!JsonState::new().feed(b"{\xc3\xa9"), "non-ASCII outside a string");
    }

    #[test]
    fn feed_failure_leaves_the_state() {
        let mut st = JsonState::new();
        assert!(st.feed(b"{\"a\":"));
        let before = st;
        assert!(!st.feed(b"1]"));
        assert_eq!(st, before);
    }

    #[test]
    fn caps() {
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH - 1);
        let mut st = JsonState::new();
        assert!(st.feed(deep.as_bytes()));
        assert!(!st.accepts(b"["), "past the depth cap");
        assert!(st.feed(b"1") && st.feed("]".repeat(MAX_DEPTH - 1).as_bytes()) && st.feed(b"}") && st.is_complete());

        let mut st = JsonState::new();
        assert!(st.feed(" ".repeat(MAX_WS_RUN as usize).as_bytes()));
        assert!(!st.accepts(b" ") && st.feed(b"{"));
        assert!(st.feed(" ".repeat(MAX_WS_RUN as usize).as_bytes()) && !st.accepts(b"\n"));

        // A number stops at the cap, but never where it could not end; exponents have two digits.
        let mut st = JsonState::new();
        assert!(st.feed(b"{\"a\":-"));
        assert!(st.feed("1".repeat(MAX_NUMBER_BYTES as usize - 2).as_bytes()));
        assert!(!st.accepts(b"."), "a dot would leave no room for a digit");
        assert!(st.feed(b"1") && !st.accepts(b"1") && st.feed(b"}"));
        assert!(!accepts("{\"a\":1e123") && complete("{\"a\":1e-99}"));
    }

    /// Random JSON objects, printed compact or pretty.
    fn random_value(rng: &mut StdRng, depth: usize) -> Value {
        let strings = ["", "a", "é ü", "\"q\"", "back\\slash", "tab\tnl\n", "😀", "\u{1}", "/"];
        match rng.gen_range(0..if depth > 3 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.gen()),
            2 => serde_json::json!(rng.gen_range(-1000i64..1000)),
            3 => serde_json::json!(rng.gen_range(-1e6f64..1e6)),
            4 => Value::String(strings[rng.gen_range(0..strings.len())].to_string()),
            5 => Value::Array((0..rng.gen_range(0..4)).map(|_| random_value(rng, depth + 1)).collect()),
            _ => random_object(rng, depth + 1),
        }
    }

    fn random_object(rng: &mut StdRng, depth: usize) -> Value {
        let keys = ["k", "", "ключ", "a b", "x\"y"];
        Value::Object((0..rng.gen_range(0..4)).map(|_| (keys[rng.gen_range(0..keys.len())].to_string(), random_value(rng, depth))).collect())
    }

    /// serde_json is the oracle: every prefix of a valid object is accepted, the whole completes; a
    /// one-byte mutation is accepted and complete exactly when serde_json reads it as an object (short of
    /// the caps, and with no trailing whitespace, which a reply never has).
    #[test]
    fn agrees_with_serde_json() {
        let mut rng = StdRng::seed_from_u64(7);
        let alphabet = b"{}[]\":,-+.0123456789eEtrufalsn \\u\xc3\xa9";
        for _ in 0..20_000 {
            let v = random_object(&mut rng, 0);
            let text = if rng.gen() { serde_json::to_string(&v) } else { serde_json::to_string_pretty(&v) }.unwrap();
            let mut st = JsonState::new();
            for (i, &b) in text.as_bytes().iter().enumerate() {
                assert!(st.feed(&[b]), "refused byte {i} of {text:?}");
            }
            assert!(st.is_complete(), "{text}");

            let mut m = text.into_bytes();
            let i = rng.gen_range(0..m.len());
            let b = alphabet[rng.gen_range(0..alphabet.len())];
            match rng.gen_range(0..3) {
                0 => m[i] = b,
                1 => m.insert(i, b),
                _ => {
                    m.remove(i);
                }
            }
            let ours = {
                let mut st = JsonState::new();
                st.feed(&m) && st.is_complete()
            };
            let theirs = serde_json::from_slice::<Value>(&m).is_ok_and(|v| v.is_object())
                && !m.last().is_some_and(|&b| is_ws(b))
                && !has_long_exponent(&m);
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&m));
        }
    }

    /// A number outside strings with an exponent of three or more digits (past the cap, though
    /// serde_json may read it: `0.5e123`).
    fn has_long_exponent(text: &[u8]) -> bool {
        let mut outside = Vec::new();
        let (mut in_str, mut esc) = (false, false);
        for &b in text {
            match (in_str, esc, b) {
                (true, true, _) => esc = false,
                (true, false, b'\\') => esc = true,
                (true, false, b'"') => in_str = false,
                (true, ..) => {}
                (false, _, b'"') => {
                    in_str = true;
                    outside.push(b' ');
                }
                (false, ..) => outside.push(b),
            }
        }
        (1..outside.len()).filter(|&i| matches!(outside[i], b'e' | b'E') && outside[i - 1].is_ascii_digit()).any(|i| {
            let rest = &outside[i + 1..];
            let rest = rest.strip_prefix(b"+").or(rest.strip_prefix(b"-")).unwrap_or(rest);
            rest.iter().take_while(|b| b.is_ascii_digit()).count() >= 3
        })
    }

    /// A small vocabulary: every byte, some multi-byte pieces, a control token (no bytes) and an EOG.
    fn synthetic_vocab() -> (Vec<Vec<u8>>, u32) {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for p in [
            "{\"", "\":", "\": \"", "\", \"", "},", "}", "]", "[{", "true", "false", "null", " {", "\n  ", "name",
            " hello", "1.5e", "-0", "\\u00", "\\uD83D", "é", "😀", "\"}", "\"]", ", ", "tr", "ue", "\\n", "abc\"",
        ] {
            pieces.push(p.as_bytes().to_vec());
        }
        pieces.push(Vec::new()); // a control token
        pieces.push(Vec::new()); // the EOG token
        let eog = pieces.len() as u32 - 1;
        (pieces, eog)
    }

    /// With random logits, masked greedy sampling always makes one valid object, and ends with EOG. After
    /// a while the logits favour closing bytes, so that every run ends.
    #[test]
    fn masked_random_sampling_makes_objects() {
        let (pieces, eog) = synthetic_vocab();
        let mask = JsonMask::new(pieces.iter().map(Vec::as_slice), &[eog]);
        let closers: Vec<usize> = [b'"', b'}', b']', b'0'].iter().map(|&b| b as usize).collect();
        let mut rng = StdRng::seed_from_u64(11);
        for run in 0..300 {
            let mut st = JsonState::new();
            let mut text = Vec::new();
            for step in 0.. {
                assert!(step < 5000, "run {run} did not end");
                let mut logits: Vec<f32> = (0..pieces.len() + 3).map(|_| rng.gen_range(-5.0..5.0)).collect();
                if step > 40 {
                    closers.iter().for_each(|&c| logits[c] += 100.0);
                }
                assert!(mask.apply(&st, &mut logits) > 0, "no token left after {:?}", String::from_utf8_lossy(&text));
                let id = crate::sampling::argmax(&logits);
                assert!(mask.allows(&st, id));
                if id == eog {
                    break;
                }
                assert!(st.feed(&pieces[id as usize]));
                text.extend_from_slice(&pieces[id as usize]);
            }
            assert!(st.is_complete());
            let v: Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&text)));
            assert!(v.is_object());
        }
    }

    #[test]
    fn mask_matches_allows() {
        let (pieces, eog) = synthetic_vocab();
        let mask = JsonMask::new(pieces.iter().map(Vec::as_slice), &[eog]);
        for prefix in [&b""[..], b"{", b"{\"a", b"{\"a\\", b"{\"a\\u0", b"{\"a\":", b"{\"a\":[1", b"{\"a\":1}", b"{\"\xf0\x9f"] {
            let mut st = JsonState::new();
            assert!(st.feed(prefix));
            let mut logits = vec![0.0; pieces.len()];
            let n = mask.apply(&st, &mut logits);
            let expect: Vec<bool> = (0..pieces.len() as u32).map(|id| mask.allows(&st, id)).collect();
            assert_eq!(logits.iter().map(|l| l.is_finite()).collect::<Vec<_>>(), expect, "{prefix:?}");
            assert_eq!(n, expect.iter().filter(|&&a| a).count());
            assert!(n > 0);
        }
    }
}
