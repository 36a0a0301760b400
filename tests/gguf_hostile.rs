//! Hostile GGUF files: every corruption gets a typed error naming the problem, never a panic.
//! Files are assembled byte by byte so each test controls exactly one malformation.

use pagellm::dtype::GgmlType;
use pagellm::gguf::{GgufBuilder, GgufError, GgufFile, TensorSpec, Value};
use proptest::prelude::*;

/// Raw little-endian GGUF assembly.
#[derive(Default, Clone)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default().u32(0x4655_4747).u32(version).u64(n_tensors).u64(n_kv)
    }
    fn u32(mut self, v: u32) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A u32 metadata pair.
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.str(key).u32(4).u32(v)
    }
    /// A tensor info.
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Pad to 32 and append `n` data bytes.
    fn data(mut self, n: usize) -> Raw {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend((0..n).map(|i| i as u8));
        self
    }
}

fn parse(r: Raw) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(r.0)
}

/// Assert a parse error whose message contains every fragment.
fn expect_err(r: Raw, fragments: &[&str]) {
    match parse(r) {
        Ok(_) => panic!("expected an error containing {fragments:?}, but the file parsed"),
        Err(e) => {
            let msg = e.to_string();
            for f in fragments {
                assert!(msg.contains(f), "error '{msg}' lacks '{f}'");
            }
        }
    }
}

fn valid_file() -> Vec<u8> {
    GgufBuilder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("some.array", Value::Array(pagellm::gguf::ValueType::U32, vec![Value::U32(1), Value::U32(2)]))
        .tensor(TensorSpec::new("a", &[32, 2], GgmlType::Q4_0), vec![7u8; 36])
        .tensor(TensorSpec::new("b", &[8], GgmlType::F32), vec![1u8; 32])
        .to_bytes()
        .unwrap()
}

#[test]
fn h01_empty_file() {
    expect_err(Raw::default(), &["truncated", "magic", "byte 0"]);
}

#[test]
fn h02_wrong_magic() {
    expect_err(Raw::default().u32(0x1234_5678).u32(3).u64(0).u64(0), &["not a GGUF file", "0x12345678"]);
}

#[test]
fn h03_version_1_unsupported() {
    expect_err(Raw::header(1, 0, 0), &["unsupported GGUF version 1"]);
}

#[test]
fn h04_version_from_the_future() {
    expect_err(Raw::header(99, 0, 0), &["unsupported GGUF version 99"]);
}

#[test]
fn h05_truncated_in_header() {
    expect_err(Raw::default().u32(0x4655_4747).u32(3).u32(0), &["truncated", "tensor count", "byte 8"]);
}

#[test]
fn h06_absurd_metadata_count() {
    expect_err(Raw::header(3, 0, u64::MAX), &["implausible metadata count", "18446744073709551615"]);
}

#[test]
fn h07_absurd_tensor_count() {
    expect_err(Raw::header(3, 1 << 60, 0), &["implausible tensor count"]);
}

#[test]
fn h08_absurd_key_length() {
    expect_err(Raw::header(3, 0, 1).u64(u64::MAX).u32(4).u32(0), &["metadata key length", "byte 24"]);
}

#[test]
fn h09_key_runs_past_end() {
    expect_err(Raw::header(3, 0, 1).u64(10).bytes(b"abc"), &["implausible metadata count"]);
    expect_err(Raw::header(3, 0, 1).u64(20).bytes(b"abcdefghi"), &["metadata key length", "20"]);
}

#[test]
fn h10_invalid_utf8_key() {
    expect_err(Raw::header(3, 0, 1).u64(2).bytes(&[0xff, 0xfe]).u32(4).u32(0), &["invalid UTF-8", "metadata key", "byte 24"]);
}

#[test]
fn h11_unknown_value_type() {
    expect_err(Raw::header(3, 0, 1).str("k").u32(13).u32(0), &["unknown metadata value type 13", "'k'", "byte 33"]);
}

#[test]
fn h12_absurd_array_length() {
    expect_err(Raw::header(3, 0, 1).str("arr").u32(9).u32(4).u64(1 << 40), &["array length of 'arr'", "1099511627776"]);
}

#[test]
fn h13_arrays_nested_too_deep() {
    let mut r = Raw::header(3, 0, 1).str("deep").u32(9);
    for _ in 0..20 {
        r = r.u32(9).u64(1);
    }
    expect_err(r.bytes(&[0; 64]), &["nested deeper", "'deep'"]);
}

#[test]
fn h14_duplicate_key() {
    expect_err(Raw::header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2), &["duplicate metadata key 'k'", "byte 41"]);
}

#[test]
fn h15_bad_alignment() {
    expect_err(Raw::header(3, 0, 1).kv_u32("general.alignment", 24), &["general.alignment", "power of two"]);
    expect_err(Raw::header(3, 0, 1).kv_u32("general.alignment", 0), &["general.alignment"]);
}

#[test]
fn h16_bad_dimension_count() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[], 0, 0).data(0), &["tensor 't'", "0 dimensions"]);
    expect_err(Raw::header(3, 1, 0).tensor("t", &[1, 1, 1, 1, 1], 0, 0).data(4), &["tensor 't'", "5 dimensions"]);
}

#[test]
fn h17_unknown_tensor_type() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[32], 4, 0).data(64), &["tensor 't'", "unknown tensor type id 4"]);
    expect_err(Raw::header(3, 1, 0).tensor("t", &[32], 1000, 0).data(64), &["unknown tensor type id 1000"]);
}

#[test]
fn h18_element_count_overflow() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[1 << 32, 1 << 32, 4], 0, 0).data(0), &["tensor 't'", "overflows"]);
}

#[test]
fn h19_row_not_whole_blocks() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[33], 2, 0).data(64), &["row length 33", "Q4_0", "32"]);
}

#[test]
fn h20_misaligned_offset() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[4], 0, 3).data(64), &["offset 3", "alignment 32"]);
}

#[test]
fn h21_data_past_end() {
    // 64 f32 = 256 bytes declared, 100 present.
    expect_err(Raw::header(3, 1, 0).tensor("t", &[64], 0, 0).data(100), &["tensor 't'", "past the end of the file"]);
    // Offset itself beyond the end.
    expect_err(Raw::header(3, 1, 0).tensor("t", &[8], 0, 1 << 20).data(32), &["past the end"]);
    // Offset + size overflows u64.
    expect_err(Raw::header(3, 1, 0).tensor("t", &[8], 0, u64::MAX - 31).data(32), &["past the end"]);
}

#[test]
fn h22_overlapping_tensors() {
    let r = Raw::header(3, 2, 0).tensor("a", &[16], 0, 0).tensor("b", &[16], 0, 32).data(128);
    expect_err(r, &["'a' and 'b' overlap"]);
}

#[test]
fn h23_duplicate_tensor_name() {
    let r = Raw::header(3, 2, 0).tensor("a", &[8], 0, 0).tensor("a", &[8], 0, 32).data(64);
    expect_err(r, &["tensor 'a'", "duplicate tensor name"]);
}

#[test]
fn h24_zero_dimension() {
    expect_err(Raw::header(3, 1, 0).tensor("t", &[8, 0], 0, 0).data(32), &["zero-sized dimension"]);
}

#[test]
fn h25_invalid_bool() {
    expect_err(Raw::header(3, 0, 1).str("flag").u32(7).bytes(&[2]), &["flag", "bool byte 2"]);
}

#[test]
fn h26_string_value_past_end() {
    expect_err(Raw::header(3, 0, 1).str("s").u32(8).u64(1000).bytes(b"short"), &["string value of 's' length", "1000"]);
}

#[test]
fn h27_every_truncation_of_a_valid_file_errs() {
    let bytes = valid_file();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    // The last tensor's data ends 32 bytes before the file does: any shorter prefix is missing something.
    let needed = bytes.len();
    for len in 0..needed {
        let r = GgufFile::from_bytes(bytes[..len].to_vec());
        assert!(r.is_err(), "prefix of {len} of {needed} bytes parsed");
    }
}

#[test]
fn h28_missing_file_is_an_io_error() {
    let e = GgufFile::open("/nonexistent/model.gguf").err().expect("missing file must fail");
    assert!(e.to_string().contains("cannot open /nonexistent/model.gguf"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Random byte corruptions of a valid file: parse may succeed or fail, but must not panic, and a
    /// file that parses has every tensor inside the file.
    #[test]
    fn random_corruptions_never_panic(flips in prop::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = valid_file();
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            for t in &f.tensors {
                prop_assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
            }
        }
    }
}
