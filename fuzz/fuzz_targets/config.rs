//! Any text given as `proxy.toml` yields a config or a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = cutoff::config::parse(std::path::Path::new("fuzz.toml"), text)
    {
        // Rendering the error must not panic either.
        let _ = e.to_string();
    }
});
