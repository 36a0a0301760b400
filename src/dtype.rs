//! GGML tensor element types: their GGUF type ids and block layouts (elements per block, bytes per block).
//!
//! A leaf module shared by `gguf` (to size tensor data) and `quant` (to decode it); it imports nothing.
//! Types whose layout is known but that pagellm has no kernels for (the IQ and ternary families) are
//! listed so `pagellm info` can describe any file; `is_supported` says which ones the model code can run.

use std::fmt;

/// One GGML element type. The discriminant is the id stored in GGUF tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    IQ2XXS = 16,
    IQ2XS = 17,
    IQ3XXS = 18,
    IQ1S = 19,
    IQ4NL = 20,
    IQ3S = 21,
    IQ2S = 22,
    IQ4XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

/// Elements in one K-quant super-block.
pub const QK_K: usize = 256;

/// (type, name, elements per block, bytes per block)
const TABLE: &[(GgmlType, &str, usize, usize)] = &[
    (GgmlType::F32, "F32", 1, 4),
    (GgmlType::F16, "F16", 1, 2),
    (GgmlType::Q4_0, "Q4_0", 32, 18),
    (GgmlType::Q4_1, "Q4_1", 32, 20),
    (GgmlType::Q5_0, "Q5_0", 32, 22),
    (GgmlType::Q5_1, "Q5_1", 32, 24),
    (GgmlType::Q8_0, "Q8_0", 32, 34),
    (GgmlType::Q8_1, "Q8_1", 32, 36),
    (GgmlType::Q2K, "Q2_K", QK_K, 84),
    (GgmlType::Q3K, "Q3_K", QK_K, 110),
    (GgmlType::Q4K, "Q4_K", QK_K, 144),
    (GgmlType::Q5K, "Q5_K", QK_K, 176),
    (GgmlType::Q6K, "Q6_K", QK_K, 210),
    (GgmlType::Q8K, "Q8_K", QK_K, 292),
    (GgmlType::IQ2XXS, "IQ2_XXS", QK_K, 66),
    (GgmlType::IQ2XS, "IQ2_XS", QK_K, 74),
    (GgmlType::IQ3XXS, "IQ3_XXS", QK_K, 98),
    (GgmlType::IQ1S, "IQ1_S", QK_K, 50),
    (GgmlType::IQ4NL, "IQ4_NL", 32, 18),
    (GgmlType::IQ3S, "IQ3_S", QK_K, 110),
    (GgmlType::IQ2S, "IQ2_S", QK_K, 82),
    (GgmlType::IQ4XS, "IQ4_XS", QK_K, 136),
    (GgmlType::I8, "I8", 1, 1),
    (GgmlType::I16, "I16", 1, 2),
    (GgmlType::I32, "I32", 1, 4),
    (GgmlType::I64, "I64", 1, 8),
    (GgmlType::F64, "F64", 1, 8),
    (GgmlType::IQ1M, "IQ1_M", QK_K, 56),
    (GgmlType::BF16, "BF16", 1, 2),
    (GgmlType::TQ1_0, "TQ1_0", QK_K, 54),
    (GgmlType::TQ2_0, "TQ2_0", QK_K, 66),
    (GgmlType::MXFP4, "MXFP4", 32, 17),
];

impl GgmlType {
    /// The type for a GGUF type id, or `None` for an id GGML never assigned (or retired).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.0 as u32 == id).map(|row| row.0)
    }

    /// The type for its GGML name (`"Q4_K"`, case-insensitive; `"q4_k_m"`-style suffixes are not types).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.1.eq_ignore_ascii_case(name)).map(|row| row.0)
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    fn row(self) -> &'static (GgmlType, &'static str, usize, usize) {
        // Every variant has a row: `all_types_have_rows` in the tests holds this.
        TABLE.iter().find(|row| row.0 == self).expect("GgmlType without a table row")
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().3
    }

    /// Bytes for `n` elements, or `None` when `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }

    /// Whether `quant` can dequantize this type (and so the model code can use it).
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K
        )
    }

    /// Every known type, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|row| row.0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_types_have_rows_and_ids_round_trip() {
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert!(t.type_size() > 0 && t.block_size() > 0);
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(1000), None);
    }

    #[test]
    fn bytes_for_checks_block_multiples_and_overflow() {
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert_eq!(GgmlType::Q6K.bytes_for(512), Some(420));
    }
}
