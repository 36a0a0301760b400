//! pagellm: run quantized LLMs locally.
//!
//! Module map (DESIGN.md): `dtype` names the tensor types, `gguf` reads and writes files, `quant` decodes
//! blocks, `synth` writes random-weight models for benchmarks and tests, `cli` holds the commands.

pub mod chat_template;
pub mod backend;
pub mod cli;
pub mod dtype;
pub mod engine;
pub mod gguf;
pub mod json_constraint;
pub mod kv;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod server;
pub mod synth;
pub mod tokenizer;
