//! Arbitrary bytes from "another gateway" (or anyone who can publish on the channel or write a
//! key) through the fleet's decoder: no panic; whatever decodes encodes back to a message that
//! decodes to the same event, so what a gateway applies is exactly what was sent.
#![no_main]

use helo_agent::fleet::message::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::decode(data) {
        let again = Event::decode(event.encode().as_bytes()).expect("an encoded event decodes");
        assert_eq!(again, event);
    }
});
