//! Writer -> reader round trips: every value type, nested arrays, tensors of every block type.

use pagellm::dtype::GgmlType;
use pagellm::gguf::{GgufBuilder, GgufFile, TensorSpec, Value, ValueType};
use proptest::prelude::*;

fn scalar_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        // Finite floats: NaN != NaN would make equality meaningless.
        (-1e30f32..1e30f32).prop_map(Value::F32),
        (-1e300f64..1e300f64).prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,40}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar_value().prop_recursive(3, 64, 8, |inner| {
        // An array holds one element type: take the first element's type and keep only matching ones.
        prop::collection::vec(inner, 0..8).prop_map(|items| {
            let ty = items.first().map_or(ValueType::U8, Value::value_type);
            let same: Vec<Value> = items.into_iter().filter(|v| v.value_type() == ty).collect();
            Value::Array(ty, same)
        })
    })
}

const TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn metadata_and_tensors_round_trip(
        kvs in prop::collection::vec(("[a-z.]{1,20}", value()), 0..12),
        tensors in prop::collection::vec((0usize..13, 1u64..4, 1u64..3, any::<u8>()), 0..6),
    ) {
        let mut b = GgufBuilder::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in kvs {
            if k != "general.alignment" && seen.insert(k.clone()) {
                b = b.kv(&k, v);
            }
        }
        for (i, (ti, blocks, rows, fill)) in tensors.into_iter().enumerate() {
            let ty = TYPES[ti];
            let ne0 = blocks * ty.block_size() as u64;
            let spec = TensorSpec::new(format!("t{i}"), &[ne0, rows], ty);
            let n = spec.n_bytes().unwrap() as usize;
            let data: Vec<u8> = (0..n).map(|j| (j as u8).wrapping_mul(31).wrapping_add(fill)).collect();
            b = b.tensor(spec, data);
        }
        let bytes = b.to_bytes().unwrap();
        let f = GgufFile::from_bytes(bytes).unwrap();
        prop_assert_eq!(f.version, 3);
        prop_assert_eq!(&f.metadata, &b.metadata);
        prop_assert_eq!(f.tensors.len(), b.tensors.len());
        for (t, (spec, data)) in f.tensors.iter().zip(&b.tensors) {
            prop_assert_eq!(&t.name, &spec.name);
            prop_assert_eq!(&t.dims, &spec.dims);
            prop_assert_eq!(t.ty, spec.ty);
            prop_assert_eq!(t.offset % 32, 0);
            prop_assert_eq!(f.tensor_data(t), &data[..]);
        }
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let b = GgufBuilder::new()
        .kv("general.alignment", Value::U32(64))
        .tensor(TensorSpec::new("a", &[3], GgmlType::F32), vec![1; 12])
        .tensor(TensorSpec::new("b", &[5], GgmlType::F32), vec![2; 20]);
    let f = GgufFile::from_bytes(b.to_bytes().unwrap()).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensor("b").unwrap().offset, 64);
    assert_eq!(f.tensor_data(f.tensor("b").unwrap()), &[2u8; 20]);
}

#[test]
fn writer_refuses_bad_input() {
    let dup = GgufBuilder::new().kv("k", Value::U8(1)).kv("k", Value::U8(2));
    assert!(dup.to_bytes().unwrap_err().to_string().contains("duplicate metadata key 'k'"));
    let short = GgufBuilder::new().tensor(TensorSpec::new("t", &[4], GgmlType::F32), vec![0; 15]);
    assert!(short.to_bytes().unwrap_err().to_string().contains("wrote 15 bytes, expected 16"));
    let partial = GgufBuilder::new().tensor(TensorSpec::new("t", &[16], GgmlType::Q4_0), vec![]);
    assert!(partial.to_bytes().unwrap_err().to_string().contains("whole Q4_0 blocks"));
    let mixed = GgufBuilder::new().kv("a", Value::Array(ValueType::U8, vec![Value::U8(1), Value::I8(1)]));
    assert!(mixed.to_bytes().is_err());
}

#[test]
fn tensor_data_borrows_from_a_real_map() {
    let path = std::env::temp_dir().join(format!("pagellm-map-{}.gguf", std::process::id()));
    let b = GgufBuilder::new().tensor(TensorSpec::new("w", &[64], GgmlType::F32), vec![9; 256]);
    std::fs::write(&path, b.to_bytes().unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let all = f.bytes().as_ptr_range();
    let data = f.tensor_data(f.tensor("w").unwrap());
    assert!(all.contains(&data.as_ptr()), "tensor data must be a slice of the file map");
    assert_eq!(data, &[9u8; 256]);
    std::fs::remove_file(&path).ok();
}
