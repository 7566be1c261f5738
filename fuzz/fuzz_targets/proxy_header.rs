//! Arbitrary bytes from a front proxy through the PROXY header decoder, fed growing as reads
//! would: no panic; a decoded header is never longer than the bytes; once an answer is final
//! (a header or invalid), more bytes never change it; a decoded v1/v2 header re-encodes to an
//! equivalent one.
#![no_main]

use helo_agent::config::ProxyProtocol;
use helo_agent::proxy::header::{Decoded, Inbound, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut settled: Option<Decoded> = None;
    for end in 0..=data.len() {
        let answer = decode(&data[..end]);
        if let Decoded::Header { len, .. } = &answer {
            assert!(*len <= end, "a header of {len} bytes out of {end}");
        }
        match (&settled, &answer) {
            (Some(first), now) => assert_eq!(first, now, "a final answer changed with more bytes"),
            (None, Decoded::NeedMore) => {}
            (None, final_answer) => settled = Some(final_answer.clone()),
        }
    }
    if let Some(Decoded::Header { inbound: Inbound::Proxied { client, local }, .. }) = settled {
        for protocol in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let again = encode(protocol, client, local);
            match decode(&again) {
                Decoded::Header { len, inbound: Inbound::Proxied { client: c, local: l } } => {
                    assert_eq!(len, again.len());
                    assert_eq!((c.port(), l.port()), (client.port(), local.port()));
                }
                other => panic!("re-encoded header does not decode: {other:?}"),
            }
        }
    }
});
