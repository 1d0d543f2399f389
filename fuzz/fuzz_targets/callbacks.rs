#![no_main]
//! `cargo fuzz run callbacks`: see fuzz/harness.rs for what is checked.

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::callbacks(data));
