//! How a token crosses processes: as bytes, through a codec the user picks.
//!
//! The store holds whatever the codec returns, so a codec that encrypts
//! (with a key every process of the fleet shares) keeps tokens encrypted at
//! rest. The crate ships no cryptography.

use std::fmt;

use super::CodecError;

/// Turns a token into the bytes stored for it, and back.
///
/// `decode(encode(t))` must give back a token equal in use to `t`. Errors
/// must not include token bytes.
///
/// # Examples
///
/// A codec for a token pair, as `access\nrefresh`:
///
/// ```
/// use epochflight::auth::coord::{CodecError, TokenCodec};
///
/// #[derive(Clone)]
/// struct Tokens { access: String, refresh: String }
///
/// struct Lines;
/// impl TokenCodec<Tokens> for Lines {
///     fn encode(&self, t: &Tokens) -> Result<Vec<u8>, CodecError> {
///         Ok(format!("{}\n{}", t.access, t.refresh).into_bytes())
///     }
///     fn decode(&self, bytes: &[u8]) -> Result<Tokens, CodecError> {
///         let text = std::str::from_utf8(bytes).map_err(|_| CodecError::new("not UTF-8"))?;
///         let (access, refresh) = text.split_once('\n').ok_or(CodecError::new("no newline"))?;
///         Ok(Tokens { access: access.into(), refresh: refresh.into() })
///     }
/// }
///
/// let bytes = Lines.encode(&Tokens { access: "a".into(), refresh: "r".into() }).unwrap();
/// assert_eq!(Lines.decode(&bytes).unwrap().refresh, "r");
/// ```
pub trait TokenCodec<T>: Send + Sync + 'static {
    /// The bytes to store for `token`.
    ///
    /// # Errors
    ///
    /// When the token cannot be encoded; nothing is written then.
    fn encode(&self, token: &T) -> Result<Vec<u8>, CodecError>;

    /// The token stored as `bytes`.
    ///
    /// # Errors
    ///
    /// When the bytes are not a token this codec wrote (another key, a
    /// truncated value): the call fails with [`CoordError::Codec`](super::CoordError::Codec).
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// Stores a `String` token as its UTF-8 bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Codec;

impl TokenCodec<String> for Utf8Codec {
    fn encode(&self, token: &String) -> Result<Vec<u8>, CodecError> {
        Ok(token.as_bytes().to_vec())
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::new("stored token is not UTF-8"))
    }
}

/// Stores a `Vec<u8>` token as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl TokenCodec<Vec<u8>> for BytesCodec {
    fn encode(&self, token: &Vec<u8>) -> Result<Vec<u8>, CodecError> {
        Ok(token.clone())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(bytes.to_vec())
    }
}

/// A codec made of two functions (see [`codec_fn`]).
pub struct FnCodec<E, D> {
    encode: E,
    decode: D,
}

/// A codec from an `encode` and a `decode` function.
///
/// # Examples
///
/// ```
/// use epochflight::auth::coord::{codec_fn, CodecError, TokenCodec};
///
/// let codec = codec_fn(
///     |n: &u64| Ok(n.to_be_bytes().to_vec()),
///     |b: &[u8]| b.try_into().map(u64::from_be_bytes).map_err(|_| CodecError::new("not 8 bytes")),
/// );
/// assert_eq!(codec.decode(&codec.encode(&7).unwrap()).unwrap(), 7);
/// ```
pub fn codec_fn<T, E, D>(encode: E, decode: D) -> FnCodec<E, D>
where
    E: Fn(&T) -> Result<Vec<u8>, CodecError> + Send + Sync + 'static,
    D: Fn(&[u8]) -> Result<T, CodecError> + Send + Sync + 'static,
{
    FnCodec { encode, decode }
}

impl<T, E, D> TokenCodec<T> for FnCodec<E, D>
where
    E: Fn(&T) -> Result<Vec<u8>, CodecError> + Send + Sync + 'static,
    D: Fn(&[u8]) -> Result<T, CodecError> + Send + Sync + 'static,
{
    fn encode(&self, token: &T) -> Result<Vec<u8>, CodecError> {
        (self.encode)(token)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        (self.decode)(bytes)
    }
}

impl<E, D> fmt::Debug for FnCodec<E, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnCodec")
    }
}
