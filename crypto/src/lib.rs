//! DingTalk callback crypto: the signature over a callback's query parameters and the
//! AES-256-CBC envelope around its body, in both directions (open an incoming callback,
//! seal a reply or a push).
//!
//! Owns: key validation, signing, verification, framing, padding, encryption and decryption.
//! Does not own: HTTP (reading `signature`/`timestamp`/`nonce`/`encrypt`, writing the reply),
//! parsing the decrypted JSON, choosing which owner keys to accept, or logging. Everything here
//! is a pure function of its inputs plus, for [`CallbackCrypto::encrypt`], [`random_nonce`] and
//! [`random_aes_key`], the thread-local CSPRNG. Nothing here panics on untrusted input.
//!
//! The format follows the DingTalk callback crypto section of `docs/dingtalk.md` (§4)
//! and <https://open.dingtalk.com/document/development/http-callback-overview>:
//!
//! - key: `base64(aes_key + "=")`, 32 bytes; IV: the first 16 key bytes, for every message;
//! - frame: 16-byte random prefix ‖ u32 big-endian message length ‖ message ‖ owner key
//!   (corp id, suite key or AppKey; called the receiver id here);
//! - padding: PKCS#7 style with block size **32** (1..=32 bytes), then AES-256-CBC without
//!   cipher-level padding; `encrypt` is standard base64 of the ciphertext;
//! - signature: lower-case hex SHA-1 over `token`, `timestamp`, `nonce` and `encrypt` sorted in
//!   byte order and concatenated.
//!
//! Checks on the way in run in the order of the shared test vectors (`tests/data/crypto-vectors.json`,
//! `about.check_order`): signature → base64 → ciphertext length → AES → padding → length field →
//! receiver id → UTF-8.

use std::fmt;

use aes::Aes256;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha1::{Digest, Sha1};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of an AES key as DingTalk's console hands it out (43 base64 characters = 32 bytes).
const AES_KEY_CHARS: usize = 43;
/// Length of the random prefix at the start of every frame.
const PREFIX_LEN: usize = 16;
/// Prefix plus the 4-byte length field.
const HEADER_LEN: usize = PREFIX_LEN + 4;
/// DingTalk pads to 32 bytes, not to the AES block size (docs/dingtalk.md §4.3).
const PAD_BLOCK: usize = 32;
/// Lower-case hex of a SHA-1 digest.
const SIGNATURE_HEX_LEN: usize = 40;

/// Decodes the AES key. The 43rd character carries 2 bits that are not part of the key and are
/// usually non-zero; the strict engine rejects ~3/4 of real keys with `InvalidLastSymbol`, while
/// DingTalk's Java/Python/PHP libraries ignore those bits, so we do too (docs/dingtalk.md §4.1).
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type CbcDec<'a> = cbc::Decryptor<&'a Aes256>;
type CbcEnc<'a> = cbc::Encryptor<&'a Aes256>;

/// Why a callback could not be opened; one variant per kind in the vectors' `error_kinds`.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Error {
    /// SHA-1 over the sorted four strings differs from the `signature` parameter.
    #[error("signature does not match")]
    BadSignature,
    /// `encrypt` is not canonical standard base64.
    #[error("encrypt is not valid base64")]
    InvalidBase64,
    /// The decoded ciphertext is empty or not a multiple of the AES block size.
    #[error("ciphertext length {0} is not a non-zero multiple of 16")]
    BadCiphertextLength(usize),
    /// The last decrypted byte is 0, above 32 or above the decrypted length. This is what a
    /// wrong AES key usually looks like.
    #[error("bad padding (wrong AES key?)")]
    BadPadding,
    /// The unpadded frame is shorter than its 20-byte header, or the length field points past it.
    #[error("bad length field")]
    BadLength,
    /// The owner key after the message is not one we accept. `received` identifies those bytes
    /// without carrying them: an owner key may be an AppKey (half of the app's credentials), and
    /// with a wrong length field the "owner key" is really the tail of the decrypted message.
    #[error("owner key {received} is not one we accept")]
    ReceiverIdMismatch {
        /// Fingerprint of the bytes found where the owner key should be.
        received: Fingerprint,
    },
    /// The message bytes are not UTF-8.
    #[error("message is not valid UTF-8")]
    InvalidUtf8,
}

impl Error {
    /// Stable snake_case name of the kind, as in the test vectors' `error_kinds`; fit for a
    /// metrics label (never carries input data).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadSignature => "bad_signature",
            Error::InvalidBase64 => "invalid_base64",
            Error::BadCiphertextLength(_) => "bad_ciphertext_length",
            Error::BadPadding => "bad_padding",
            Error::BadLength => "bad_length",
            Error::ReceiverIdMismatch { .. } => "receiver_id_mismatch",
            Error::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// Identifies bytes without revealing them, for logs and errors: the first 4 bytes of their
/// SHA-256 (8 hex digits) and their length. An operator matches it against a candidate with
/// `printf %s CANDIDATE | sha256sum | cut -c1-8`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    sha256_prefix: [u8; 4],
    len: usize,
}

impl Fingerprint {
    /// The fingerprint of `bytes`.
    #[must_use]
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        Self {
            sha256_prefix: [digest[0], digest[1], digest[2], digest[3]],
            len: bytes.len(),
        }
    }

    /// How many bytes were fingerprinted.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes were fingerprinted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sha256:{} ({} bytes)",
            hex::encode(self.sha256_prefix),
            self.len
        )
    }
}

/// The same as `Display`: a `{:?}` in a log must not reveal more than a `{}`.
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The AES key is not 43 characters of A-Z a-z 0-9. Carries the number of characters given.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("AES key must be exactly 43 characters, each one of A-Z, a-z, 0-9 (got {0} characters)")]
pub struct InvalidAesKey(pub usize);

/// A decrypted callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The message (for an event, JSON text).
    pub message: String,
    /// The owner key the message was addressed to; one of the accepted ones.
    pub receiver_id: String,
}

/// An encrypted and signed message, ready for a callback reply or a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Standard base64 of the ciphertext, without line breaks.
    pub encrypt: String,
    /// Lower-case hex SHA-1 signature over token, timestamp, nonce and `encrypt`.
    pub signature: String,
}

/// The callback token and AES key of one DingTalk subscription.
///
/// Holds the expanded AES key, so build it once at start-up and share it (`Arc` or `&`); every
/// method takes `&self`.
#[derive(Clone)]
pub struct CallbackCrypto {
    token: String,
    cipher: Aes256,
    /// DingTalk's fixed IV: the first 16 key bytes.
    iv: aes::Block,
}

impl fmt::Debug for CallbackCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackCrypto")
            .field("token", &"***")
            .field("aes_key", &"***")
            .finish()
    }
}

impl CallbackCrypto {
    /// Builds the crypto for a token and a 43-character AES key (the console's "加密 aes_key").
    ///
    /// # Errors
    /// [`InvalidAesKey`] unless `aes_key` is exactly 43 characters of A-Z, a-z, 0-9.
    pub fn new(token: &str, aes_key: &str) -> Result<Self, InvalidAesKey> {
        let chars = aes_key.chars().count();
        if chars != AES_KEY_CHARS || !aes_key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(InvalidAesKey(chars));
        }
        let key: [u8; 32] = KEY_ENGINE
            .decode(aes_key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(InvalidAesKey(chars))?;
        let cipher = Aes256::new(&key.into());
        let mut iv = aes::Block::default();
        iv.copy_from_slice(&key[..16]);
        Ok(Self {
            token: token.to_owned(),
            cipher,
            iv,
        })
    }

    /// Lower-case hex SHA-1 over `token`, `timestamp`, `nonce` and `encrypt`, sorted in byte
    /// order and concatenated without separator (docs/dingtalk.md §4.4).
    #[must_use]
    pub fn signature(&self, timestamp: &str, nonce: &str, encrypt: &str) -> String {
        hex::encode(self.digest(timestamp, nonce, encrypt))
    }

    /// Checks `signature` against the expected one, in constant time. The comparison is exact:
    /// DingTalk and every reference library send lower-case hex, so upper case is rejected.
    ///
    /// # Errors
    /// [`Error::BadSignature`] on any difference.
    pub fn verify(
        &self,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
        signature: &str,
    ) -> Result<(), Error> {
        let mut expected = [0u8; SIGNATURE_HEX_LEN];
        hex::encode_to_slice(self.digest(timestamp, nonce, encrypt), &mut expected)
            .map_err(|_| Error::BadSignature)?;
        // `ct_eq` on slices of different lengths is false without looking at the contents;
        // the length of a SHA-1 hex string is no secret.
        if bool::from(expected.as_slice().ct_eq(signature.as_bytes())) {
            Ok(())
        } else {
            Err(Error::BadSignature)
        }
    }

    fn digest(&self, timestamp: &str, nonce: &str, encrypt: &str) -> [u8; 20] {
        // `str`'s `Ord` is byte order, as Java's `Arrays.sort` on ASCII and Python's `sorted`.
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypt];
        parts.sort_unstable();
        let mut hasher = Sha1::new();
        for part in parts {
            hasher.update(part.as_bytes());
        }
        hasher.finalize().into()
    }

    /// Decrypts `encrypt` (the body's `encrypt` member) without looking at the signature.
    ///
    /// The owner key after the message must equal one of `accepted_receivers` exactly; it is
    /// checked before the message's UTF-8, per the vectors' check order. Padding is stripped by
    /// its last byte only (1..=32), and the ciphertext only has to be a multiple of 16, because
    /// the reference decoders accept frames padded to 16 (vector pos-24).
    ///
    /// # Errors
    /// Any [`Error`] except [`Error::BadSignature`].
    pub fn decrypt(&self, encrypt: &str, accepted_receivers: &[&str]) -> Result<Opened, Error> {
        let mut buf = STANDARD.decode(encrypt).map_err(|_| Error::InvalidBase64)?;

        let (blocks, tail) = aes::Block::slice_as_chunks_mut(&mut buf);
        if blocks.is_empty() || !tail.is_empty() {
            return Err(Error::BadCiphertextLength(buf.len()));
        }
        CbcDec::inner_iv_init(&self.cipher, &self.iv).decrypt_blocks(blocks);

        // Not a constant-time unpad: there is no padding oracle to protect, since every
        // request is authenticated by the signature before we get here (`open`).
        let pad = usize::from(buf.last().copied().unwrap_or(0));
        if pad == 0 || pad > PAD_BLOCK || pad > buf.len() {
            return Err(Error::BadPadding);
        }
        let frame_len = buf.len() - pad;
        let frame = &buf[..frame_len];

        let Some(len_field) = frame.get(PREFIX_LEN..HEADER_LEN) else {
            return Err(Error::BadLength);
        };
        let msg_len = u32::from_be_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]);
        // Compare against what is left instead of computing 20 + len, which can overflow
        // (vector neg-21 carries 0xffffffff).
        let msg_len = usize::try_from(msg_len).map_err(|_| Error::BadLength)?;
        if msg_len > frame_len - HEADER_LEN {
            return Err(Error::BadLength);
        }
        let msg_end = HEADER_LEN + msg_len;

        let owner = &frame[msg_end..];
        let Some(receiver_id) = accepted_receivers
            .iter()
            .find(|accepted| accepted.as_bytes() == owner)
        else {
            return Err(Error::ReceiverIdMismatch {
                received: Fingerprint::of(owner),
            });
        };
        let receiver_id = (*receiver_id).to_owned();

        // Reuse the decoded buffer for the message instead of copying it into a new one.
        buf.copy_within(HEADER_LEN..msg_end, 0);
        buf.truncate(msg_len);
        let message = String::from_utf8(buf).map_err(|_| Error::InvalidUtf8)?;
        Ok(Opened {
            message,
            receiver_id,
        })
    }

    /// Verifies the signature, then decrypts: what a callback handler calls.
    ///
    /// # Errors
    /// [`Error::BadSignature`] first, then whatever [`CallbackCrypto::decrypt`] reports.
    pub fn open(
        &self,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
        signature: &str,
        accepted_receivers: &[&str],
    ) -> Result<Opened, Error> {
        self.verify(timestamp, nonce, encrypt, signature)?;
        self.decrypt(encrypt, accepted_receivers)
    }

    /// Encrypts `message` for `receiver_id` with a given 16-byte prefix; deterministic, so the
    /// test vectors can be reproduced byte for byte. Pads to 32 as every official library does
    /// (not to 16 like DingTalk's own Rust sample, docs/dingtalk.md §4.3). Base64 has no line breaks.
    ///
    /// # Panics
    /// If `message` is 4 GiB or longer, which the frame's u32 length field cannot express.
    #[must_use]
    pub fn encrypt_with_prefix(
        &self,
        message: &str,
        receiver_id: &str,
        prefix: [u8; 16],
    ) -> String {
        let msg = message.as_bytes();
        let msg_len = u32::try_from(msg.len())
            .expect("a DingTalk frame cannot carry a message of 4 GiB or more");
        let frame_len = HEADER_LEN + msg.len() + receiver_id.len();
        let pad = PAD_BLOCK - frame_len % PAD_BLOCK;
        let mut buf = Vec::with_capacity(frame_len + pad);
        buf.extend_from_slice(&prefix);
        buf.extend_from_slice(&msg_len.to_be_bytes());
        buf.extend_from_slice(msg);
        buf.extend_from_slice(receiver_id.as_bytes());
        // `pad` is 1..=32, so the cast is exact.
        buf.resize(frame_len + pad, pad as u8);

        // The buffer is a multiple of 32 bytes, so there is no tail.
        let (blocks, _) = aes::Block::slice_as_chunks_mut(&mut buf);
        CbcEnc::inner_iv_init(&self.cipher, &self.iv).encrypt_blocks(blocks);
        STANDARD.encode(&buf)
    }

    /// Encrypts with a random prefix of 16 alphanumeric characters, as the official libraries do.
    ///
    /// # Panics
    /// As [`CallbackCrypto::encrypt_with_prefix`].
    #[must_use]
    pub fn encrypt(&self, message: &str, receiver_id: &str) -> String {
        let mut prefix = [0u8; PREFIX_LEN];
        let mut rng = rand::rng();
        for byte in &mut prefix {
            *byte = rng.sample(Alphanumeric);
        }
        self.encrypt_with_prefix(message, receiver_id, prefix)
    }

    /// Encrypts and signs, for a callback reply (`success`) or a push. The caller puts
    /// `timestamp` and `nonce` next to the result, exactly as given here.
    ///
    /// # Panics
    /// As [`CallbackCrypto::encrypt_with_prefix`].
    #[must_use]
    pub fn seal(&self, message: &str, receiver_id: &str, timestamp: &str, nonce: &str) -> Sealed {
        let encrypt = self.encrypt(message, receiver_id);
        let signature = self.signature(timestamp, nonce, &encrypt);
        Sealed { encrypt, signature }
    }
}

/// A random nonce of `len` alphanumeric characters (16 is accepted everywhere, docs/dingtalk.md §4.7).
#[must_use]
pub fn random_nonce(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A random valid 43-character AES key, for generated local secrets and tests.
#[must_use]
pub fn random_aes_key() -> String {
    random_nonce(AES_KEY_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVER: &str = "ding7f3a9c2e51b04d86";

    fn crypto() -> CallbackCrypto {
        CallbackCrypto::new(
            "approvalCbToken",
            "m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZN",
        )
        .expect("valid key")
    }

    /// Decrypts without unpadding, to look at the raw frame.
    fn raw_frame(c: &CallbackCrypto, encrypt: &str) -> Vec<u8> {
        let mut buf = STANDARD.decode(encrypt).expect("base64");
        let (blocks, tail) = aes::Block::slice_as_chunks_mut(&mut buf);
        assert!(tail.is_empty());
        CbcDec::inner_iv_init(&c.cipher, &c.iv).decrypt_blocks(blocks);
        buf
    }

    fn sample_messages() -> Vec<String> {
        let mut messages: Vec<String> = (0..100).map(|n| "x".repeat(n)).collect();
        messages.push("张三的请假申请，原因：家中有事😀".to_owned());
        messages.push("审批".repeat(1000));
        messages
            .push(r#"{"EventType":"bpms_instance_change","title":"张三的请假申请"}"#.repeat(120));
        messages.push("a".repeat(64 * 1024 + 3));
        messages
    }

    #[test]
    fn messages_of_many_lengths_round_trip() {
        let c = crypto();
        for message in sample_messages() {
            let sealed = c.seal(&message, RECEIVER, "1718090000000", "pX7aQ2mZ");
            let opened = c
                .open(
                    "1718090000000",
                    "pX7aQ2mZ",
                    &sealed.encrypt,
                    &sealed.signature,
                    &[RECEIVER],
                )
                .expect("round trip");
            assert_eq!(opened.message, message);
            assert_eq!(opened.receiver_id, RECEIVER);
        }
    }

    #[test]
    fn random_keys_round_trip_and_other_keys_do_not_decrypt() {
        for _ in 0..50 {
            let key = random_aes_key();
            let token = random_nonce(12);
            let c = CallbackCrypto::new(&token, &key).expect("random key is valid");
            let message = format!(r#"{{"EventType":"check_url","n":"{}"}}"#, random_nonce(9));
            let encrypt = c.encrypt(&message, "suitefq8wz3kd1xjcm0vh");
            let opened = c
                .decrypt(&encrypt, &["dingother", "suitefq8wz3kd1xjcm0vh"])
                .expect("decrypts");
            assert_eq!(opened.message, message);
            assert_eq!(opened.receiver_id, "suitefq8wz3kd1xjcm0vh");

            let other = CallbackCrypto::new(&token, &random_aes_key()).expect("valid");
            // With a wrong key the noise rarely passes padding, length and receiver checks
            // together; it must fail somewhere, never decrypt to something.
            assert!(other.decrypt(&encrypt, &["suitefq8wz3kd1xjcm0vh"]).is_err());
        }
    }

    #[test]
    fn encrypt_uses_a_fresh_alphanumeric_prefix_each_time() {
        let c = crypto();
        let a = c.encrypt("success", RECEIVER);
        let b = c.encrypt("success", RECEIVER);
        assert_ne!(a, b);
        for encrypt in [a, b] {
            let frame = raw_frame(&c, &encrypt);
            assert!(frame[..16].iter().all(u8::is_ascii_alphanumeric));
        }
    }

    #[test]
    fn padding_is_one_to_thirty_two_bytes_of_its_own_length() {
        let c = crypto();
        let mut seen = [false; 33];
        for n in 0..64 {
            let message = "m".repeat(n);
            let encrypt = c.encrypt_with_prefix(&message, RECEIVER, [b'p'; 16]);
            assert!(!encrypt.contains('\n'));
            let frame = raw_frame(&c, &encrypt);
            assert_eq!(frame.len() % 32, 0);
            let pad = usize::from(*frame.last().expect("non-empty"));
            assert!((1..=32).contains(&pad), "pad {pad}");
            assert!(
                frame[frame.len() - pad..]
                    .iter()
                    .all(|&b| usize::from(b) == pad)
            );
            assert_eq!(frame.len() - pad, 20 + n + RECEIVER.len());
            seen[pad] = true;
        }
        assert!(
            seen[1..].iter().all(|&s| s),
            "every pad length 1..=32 occurs"
        );
    }

    #[test]
    fn decrypt_accepts_padding_that_only_the_last_byte_describes() {
        // Reference decoders look at the last byte only; a frame padded with junk followed by
        // a valid count must still open (and one padded to 16 rather than 32, see pos-24).
        let c = crypto();
        let mut frame = Vec::new();
        frame.extend_from_slice(&[b'q'; 16]);
        frame.extend_from_slice(&2u32.to_be_bytes());
        frame.extend_from_slice(b"ok");
        frame.extend_from_slice(RECEIVER.as_bytes());
        frame.extend_from_slice(&[0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0x06]);
        assert_eq!(frame.len(), 48);
        let (blocks, _) = aes::Block::slice_as_chunks_mut(&mut frame);
        CbcEnc::inner_iv_init(&c.cipher, &c.iv).encrypt_blocks(blocks);
        let encrypt = STANDARD.encode(&frame);
        let opened = c.decrypt(&encrypt, &[RECEIVER]).expect("opens");
        assert_eq!(opened.message, "ok");
    }

    #[test]
    fn upper_case_signature_is_rejected() {
        let c = crypto();
        let sealed = c.seal("success", RECEIVER, "1718090000000", "pX7aQ2mZ");
        let upper = sealed.signature.to_ascii_uppercase();
        assert_ne!(
            upper, sealed.signature,
            "a digest with no letter is vanishingly rare"
        );
        assert_eq!(
            c.verify("1718090000000", "pX7aQ2mZ", &sealed.encrypt, &upper),
            Err(Error::BadSignature)
        );
        assert_eq!(
            c.verify(
                "1718090000000",
                "pX7aQ2mZ",
                &sealed.encrypt,
                &sealed.signature
            ),
            Ok(())
        );
    }

    #[test]
    fn signature_of_wrong_length_or_empty_is_rejected() {
        let c = crypto();
        let good = c.signature("1", "2", "3");
        assert_eq!(good.len(), 40);
        for bad in ["", &good[..39], &format!("{good}0"), &format!(" {good}")] {
            assert_eq!(c.verify("1", "2", "3", bad), Err(Error::BadSignature));
        }
    }

    #[test]
    fn debug_output_hides_the_token_and_key() {
        let key = "m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZN";
        let c = CallbackCrypto::new("approvalCbToken", key).expect("valid");
        let debug = format!("{c:?}");
        assert_eq!(debug, r#"CallbackCrypto { token: "***", aes_key: "***" }"#);
        assert!(!format!("{c:#?}").contains("approvalCbToken"));
    }

    #[test]
    fn aes_keys_other_than_43_alphanumeric_characters_are_refused() {
        let good = "m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZN";
        assert!(CallbackCrypto::new("t", good).is_ok());
        let cases = [
            ("", 0),
            (&good[..42], 42),
            ("m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZNx", 44),
            ("m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZ=", 43),
            ("m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0a+/", 43),
            ("m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0a_-", 43),
            ("m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZ ", 43),
            ("钉钉m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0a", 43),
        ];
        for (key, chars) in cases {
            let err = CallbackCrypto::new("t", key).expect_err(key);
            assert_eq!(err, InvalidAesKey(chars));
        }
        assert_eq!(
            InvalidAesKey(42).to_string(),
            "AES key must be exactly 43 characters, each one of A-Z, a-z, 0-9 (got 42 characters)"
        );
    }

    #[test]
    fn keys_with_non_zero_trailing_bits_are_accepted() {
        // The last 'N' of this key has non-zero low bits; a strict decoder would refuse it.
        let key = "m0xVQzJXtw3XVBOsrT5mH3DaWvTrmFLHBMUAPTT0aZN";
        assert!(STANDARD.decode(format!("{key}=")).is_err());
        let c = CallbackCrypto::new("t", key).expect("valid");
        assert_eq!(
            hex::encode(c.iv),
            "9b4c55433257b70dd75413acad3e661f",
            "IV is the first half of the key"
        );
    }

    #[test]
    fn error_messages_and_kinds_are_stable() {
        let cases = [
            (
                Error::BadSignature,
                "bad_signature",
                "signature does not match",
            ),
            (
                Error::InvalidBase64,
                "invalid_base64",
                "encrypt is not valid base64",
            ),
            (
                Error::BadCiphertextLength(40),
                "bad_ciphertext_length",
                "ciphertext length 40 is not a non-zero multiple of 16",
            ),
            (
                Error::BadPadding,
                "bad_padding",
                "bad padding (wrong AES key?)",
            ),
            (Error::BadLength, "bad_length", "bad length field"),
            (
                Error::ReceiverIdMismatch {
                    received: Fingerprint::of(b"dingother"),
                },
                "receiver_id_mismatch",
                "owner key sha256:a899732a (9 bytes) is not one we accept",
            ),
            (
                Error::InvalidUtf8,
                "invalid_utf8",
                "message is not valid UTF-8",
            ),
        ];
        for (err, kind, text) in cases {
            assert_eq!(err.kind(), kind);
            assert_eq!(err.to_string(), text);
        }
    }

    #[test]
    fn receiver_id_mismatch_reports_the_owner_key_found() {
        let c = crypto();
        let encrypt = c.encrypt("{}", "dingotherc0rp0000000");
        let err = c.decrypt(&encrypt, &[RECEIVER]).unwrap_err();
        assert_eq!(
            err,
            Error::ReceiverIdMismatch {
                received: Fingerprint::of(b"dingotherc0rp0000000")
            }
        );
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("dingother"), "{shown}");
            assert!(shown.contains("(20 bytes)"), "{shown}");
        }
        assert!(matches!(
            c.decrypt(&encrypt, &[]),
            Err(Error::ReceiverIdMismatch { .. })
        ));
    }

    #[test]
    fn a_wrong_length_field_does_not_put_the_message_into_the_error() {
        // A length field that stops short makes the rest of the message look like the owner key.
        let c = crypto();
        let secret = "张三的工资条 salary=12345";
        let mut frame = Vec::new();
        frame.extend_from_slice(&[b'q'; 16]);
        frame.extend_from_slice(&2u32.to_be_bytes());
        frame.extend_from_slice(secret.as_bytes());
        frame.extend_from_slice(RECEIVER.as_bytes());
        let pad = 32 - frame.len() % 32;
        frame.resize(frame.len() + pad, pad as u8);
        let (blocks, _) = aes::Block::slice_as_chunks_mut(&mut frame);
        CbcEnc::inner_iv_init(&c.cipher, &c.iv).encrypt_blocks(blocks);
        let err = c
            .decrypt(&STANDARD.encode(&frame), &[RECEIVER])
            .unwrap_err();
        assert_eq!(err.kind(), "receiver_id_mismatch");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("salary"), "{shown}");
            assert!(!shown.contains(RECEIVER), "{shown}");
        }
    }

    #[test]
    fn a_fingerprint_shows_a_hash_prefix_and_a_length_only() {
        let f = Fingerprint::of(b"dingappkey123");
        assert_eq!(f.to_string(), format!("{f:?}"));
        assert!(f.to_string().starts_with("sha256:"));
        assert_eq!((f.len(), f.is_empty()), (13, false));
        assert_ne!(f, Fingerprint::of(b"dingappkey124"));
    }

    #[test]
    fn malformed_input_is_refused_without_panicking() {
        let c = crypto();
        let valid = c.encrypt("success", RECEIVER);
        let inputs = [
            String::new(),
            "=".to_owned(),
            "====".to_owned(),
            "AAAA".to_owned(),
            "A".repeat(22) + "==",
            "A".repeat(43) + "=",
            STANDARD.encode([0u8; 16]),
            STANDARD.encode([0xffu8; 32]),
            STANDARD.encode(vec![7u8; 4096]),
            valid[..valid.len() - 4].to_owned(),
            valid.replace('=', ""),
            format!("{valid}\n"),
            "钉钉钉钉".to_owned(),
        ];
        for input in inputs {
            assert!(c.decrypt(&input, &[RECEIVER]).is_err(), "{input:?}");
        }
        // Truncations and bit flips of a valid ciphertext: whatever the outcome, no panic.
        let bytes = STANDARD.decode(&valid).expect("base64");
        for cut in 0..bytes.len() {
            let _ = c.decrypt(&STANDARD.encode(&bytes[..cut]), &[RECEIVER]);
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                let _ = c.decrypt(&STANDARD.encode(&flipped), &[RECEIVER]);
            }
        }
    }

    #[test]
    fn random_nonce_has_the_requested_length_and_alphabet() {
        for len in [0, 1, 8, 16, 64] {
            let nonce = random_nonce(len);
            assert_eq!(nonce.len(), len);
            assert!(nonce.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        assert_ne!(random_nonce(16), random_nonce(16));
        assert_ne!(random_aes_key(), random_aes_key());
    }
}
