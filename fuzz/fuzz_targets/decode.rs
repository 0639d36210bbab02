//! The message decoder on arbitrary bytes: never panics, allocates nothing, and whatever it
//! accepts re-encodes to exactly the bytes it came from (one canonical form per message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerpipe::protocol::Message;
use peerpipe_fuzz::AllocProbe;

fuzz_target!(|data: &[u8]| {
    let probe = AllocProbe::start();
    let decoded = Message::decode(data);
    probe.check("decode");
    if let Ok(m) = decoded {
        assert_eq!(&m.encode()[..], data, "non-canonical accept of {m:?}");
    }
});
