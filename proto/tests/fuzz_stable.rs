//! Runs the `rpc_frame` fuzz target's function on random inputs in a plain
//! `cargo test`, so the target cannot rot: arbitrary bytes, and valid frames
//! with random corruption (which reach the body CRC and codec paths that
//! random bytes almost never do).

use bytes::Bytes;
use flyfs_proto::frame::{HEADER_LEN, Kind, OutFrame, Status, fuzz_decode};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzz_decode(&data);
    }

    #[test]
    fn corrupted_frames_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        method in any::<u16>(),
        request_id in any::<u64>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
    ) {
        let frame = OutFrame::new(
            Kind::Request,
            method,
            Status::Ok,
            request_id,
            Bytes::from(body),
            Bytes::from(payload),
        )
        .expect("small frame");
        let mut bytes = frame.header.to_vec();
        bytes.extend_from_slice(&frame.body);
        bytes.extend_from_slice(&frame.payload);
        for (at, mask) in flips {
            let at = at % bytes.len();
            bytes[at] ^= mask;
        }
        let cut = HEADER_LEN + cut % (bytes.len() - HEADER_LEN + 1);
        fuzz_decode(&bytes[..cut]);
    }
}

#[test]
fn valid_frames_with_messages_pass_every_check() {
    #[derive(serde::Serialize)]
    struct Sample {
        offset: u32,
        names: Vec<String>,
    }
    let body = flyfs_proto::codec::encode(&Sample {
        offset: 7,
        names: vec!["a".into()],
    });
    let frame =
        OutFrame::new(Kind::Request, 300, Status::Ok, 1, body, Bytes::new()).expect("small frame");
    let mut bytes = frame.header.to_vec();
    bytes.extend_from_slice(&frame.body);
    fuzz_decode(&bytes);
}
