//! The callback path from the body onwards, as `POST /dingtalk/callback` runs it: JSON body,
//! signature, base64, AES-CBC, padding, length field, owner key, UTF-8, event JSON. The first
//! byte picks how far in the input starts, so that every stage gets input it can reach: a
//! correct signature is computed over whatever `encrypt` the input holds, since the fuzzer could
//! never guess one. Nothing may panic, and nothing may allocate without bound.

#![no_main]

use base64::{Engine, engine::general_purpose::STANDARD};
use dingsync::{
    crypto::CallbackCrypto,
    event::{self, Source},
};
use libfuzzer_sys::fuzz_target;

const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const OWNER: &str = "dingfuzzcorp";

fn open_and_parse(keys: &CallbackCrypto, encrypt: &str) {
    let signature = keys.signature("1700000000000", "fuzznonc", encrypt);
    if let Ok(opened) = keys.open("1700000000000", "fuzznonc", encrypt, &signature, &[OWNER]) {
        let _ = event::parse(&opened.message, Source::HttpPush, OWNER);
    }
}

fuzz_target!(|data: &[u8]| {
    let keys = CallbackCrypto::new("fuzztoken", AES_KEY).expect("valid key");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 4 {
        // The whole body, `{"encrypt": "..."}`.
        0 => {
            if let Ok(body) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(encrypt) = body.get("encrypt").and_then(|v| v.as_str())
            {
                open_and_parse(&keys, encrypt);
            }
        }
        // The `encrypt` string itself.
        1 => open_and_parse(&keys, &text),
        // Raw ciphertext bytes (valid base64 by construction).
        2 => open_and_parse(&keys, &STANDARD.encode(rest)),
        // A decrypted message, as the event parser sees it.
        _ => {
            let _ = event::parse(&text, Source::HttpPush, OWNER);
        }
    }
});
