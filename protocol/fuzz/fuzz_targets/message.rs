//! Fuzz the command decoder: arbitrary bytes through `Decoder::decode` (twice, with the same decoder, to
//! exercise its recycled buffers), then the encoders on what came out. Nothing may panic; a publish's
//! `data` must be a slice of the input, byte for byte; the payload must be left untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use throng_protocol::message::{
    encode_command, encode_error, encode_message, message_len, parse_channel, Command, Decoder, Limits,
};

fuzz_target!(|input: &[u8]| {
    let payload = input.to_vec();
    let mut decoder = Decoder::with_limits(Limits { max_data_bytes: 1024, ..Limits::default() });
    for _ in 0..2 {
        let mut out = Vec::new();
        match decoder.decode(&payload) {
            Ok(cmd) => {
                if let Some(channel) = cmd.channel() {
                    assert!(parse_channel(channel, 128).is_ok());
                }
                if let Command::Publish { channel, data, .. } = cmd {
                    assert!(!data.is_empty() && data.len() <= 1024);
                    // `data` is a subslice of the input, at the same bytes.
                    let start = data.as_ptr() as usize - payload.as_ptr() as usize;
                    assert_eq!(&input[start..start + data.len()], data);
                    encode_message(&mut out, channel, 7, data);
                    assert_eq!(out.len(), message_len(channel, 7, data));
                }
                // What a client would send for this command decodes to the same command.
                out.clear();
                encode_command(&mut out, &cmd);
                let mut again = Decoder::new();
                assert_eq!(again.decode(&out), Ok(cmd));
            }
            Err(e) => {
                encode_error(&mut out, e.id, e.code(), &e.to_string());
            }
        }
    }
    assert_eq!(payload, input);
});
