//! Property tests of the callback crypto: whatever the message, owner key, timestamp or nonce,
//! sealing then opening gives the message back; whatever arrives, opening never panics; and any
//! change to a sealed message is refused.

use base64::{Engine, engine::general_purpose::STANDARD};
use dingsync::crypto::{self, CallbackCrypto, Error};
use proptest::prelude::*;

fn keys() -> CallbackCrypto {
    CallbackCrypto::new("dingsyncpropertytoken", &crypto::random_aes_key()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_message_sealed_for_an_owner_key_opens_to_the_same_text(
        message in "\\PC{0,2000}",
        owner in "[A-Za-z0-9]{1,64}",
        timestamp in "[0-9]{10,13}",
        nonce in "[A-Za-z0-9]{1,16}",
    ) {
        let keys = keys();
        let sealed = keys.seal(&message, &owner, &timestamp, &nonce);
        let opened = keys
            .open(&timestamp, &nonce, &sealed.encrypt, &sealed.signature, &[owner.as_str()])
            .unwrap();
        prop_assert_eq!(opened.message, message);
        prop_assert_eq!(opened.receiver_id, owner);
    }

    #[test]
    fn a_sealed_message_opened_for_another_owner_key_is_refused(
        message in "\\PC{0,200}",
        owner in "[A-Za-z0-9]{1,32}",
    ) {
        let keys = keys();
        let sealed = keys.seal(&message, &owner, "1700000000000", "nonce123");
        let other = format!("{owner}x");
        let refused = keys.open("1700000000000", "nonce123", &sealed.encrypt, &sealed.signature, &[other.as_str()]);
        let is_mismatch = matches!(refused, Err(Error::ReceiverIdMismatch { .. }));
        prop_assert!(is_mismatch);
    }

    #[test]
    fn any_change_to_the_ciphertext_is_refused_by_the_signature(
        message in "\\PC{1,500}",
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let keys = keys();
        let sealed = keys.seal(&message, "dingcorp", "1700000000000", "nonce123");
        let mut bytes = STANDARD.decode(&sealed.encrypt).unwrap();
        let at = position.index(bytes.len());
        bytes[at] ^= flip;
        let tampered = STANDARD.encode(&bytes);
        let refused = keys.open("1700000000000", "nonce123", &tampered, &sealed.signature, &["dingcorp"]);
        prop_assert_eq!(refused, Err(Error::BadSignature));
    }

    /// Correctly signed garbage exercises every decoding step after the signature: it must be
    /// refused with a kind, never a panic, whatever its length or content.
    #[test]
    fn correctly_signed_garbage_is_refused_without_a_panic(
        raw in prop::collection::vec(any::<u8>(), 0..600),
        as_base64 in any::<bool>(),
    ) {
        let keys = keys();
        let encrypt = if as_base64 {
            STANDARD.encode(&raw)
        } else {
            String::from_utf8_lossy(&raw).into_owned()
        };
        let signature = keys.signature("1700000000000", "nonce123", &encrypt);
        // Random bytes can only open by chance if they decrypt to a valid frame for this
        // owner key; then the result must still be well-formed.
        if let Ok(opened) = keys.open("1700000000000", "nonce123", &encrypt, &signature, &["dingcorp"]) {
            prop_assert_eq!(opened.receiver_id, "dingcorp");
        }
    }
}
