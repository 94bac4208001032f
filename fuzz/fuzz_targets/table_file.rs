//! Fuzz target: arbitrary bytes as a table file must parse or be rejected, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = allocation::file::parse(text) {
            // Whatever parses renders back to a file that parses to the same table.
            let again = allocation::file::parse(&allocation::file::render(&t)).expect("round trip");
            assert_eq!(again, t);
        }
    }
});
