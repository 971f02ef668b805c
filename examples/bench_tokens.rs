//! Tokens signed as Better Auth signs them (EdDSA from its JWKS by default, or RS256),
//! for the benchmark: `jwks <alg> <key file>` makes a key, keeps it in the file and prints
//! the JWKS a local server publishes; `sign <alg> <key file>` reads `user token first_id`
//! lines and prints them with the token signed by that key.
//!
//!   cargo run --release --example bench_tokens -- jwks EdDSA /tmp/k > jwks.json
//!   cargo run --release --example bench_tokens -- sign EdDSA /tmp/k < users.txt > users-eddsa.txt

use std::io::BufRead;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

enum Key {
    Ed(ed25519_dalek::SigningKey),
    Rs(rsa::RsaPrivateKey),
}

impl Key {
    /// A new key, kept (PKCS#8 PEM) in `file` for `sign` to load.
    fn generate(alg: &str, file: &str) -> Self {
        let mut rng = rand_core::OsRng;
        let key = match alg {
            "EdDSA" => Self::Ed(ed25519_dalek::SigningKey::generate(&mut rng)),
            "RS256" => Self::Rs(rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap()),
            other => panic!("expected EdDSA or RS256, got {other}"),
        };
        let pem = match &key {
            Self::Ed(k) => {
                use ed25519_dalek::pkcs8::EncodePrivateKey as _;
                k.to_pkcs8_der().unwrap().as_bytes().to_vec()
            }
            Self::Rs(k) => k.to_pkcs8_der().unwrap().as_bytes().to_vec(),
        };
        std::fs::write(file, pem).unwrap();
        key
    }

    fn load(alg: &str, file: &str) -> Self {
        let der = std::fs::read(file).unwrap();
        match alg {
            "EdDSA" => {
                use ed25519_dalek::pkcs8::DecodePrivateKey as _;
                Self::Ed(ed25519_dalek::SigningKey::from_pkcs8_der(&der).unwrap())
            }
            "RS256" => Self::Rs(rsa::RsaPrivateKey::from_pkcs8_der(&der).unwrap()),
            other => panic!("expected EdDSA or RS256, got {other}"),
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Ed(_) => "EdDSA",
            Self::Rs(_) => "RS256",
        }
    }

    fn jwk(&self) -> Value {
        let enc = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk = match self {
            Self::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": enc(k.verifying_key().as_bytes())})
            }
            Self::Rs(k) => {
                json!({"kty": "RSA", "n": enc(&k.n().to_bytes_be()), "e": enc(&k.e().to_bytes_be())})
            }
        };
        jwk["kid"] = json!(format!("bench-{}", self.alg()));
        jwk["alg"] = json!(self.alg());
        jwk
    }

    fn sign(&self, claims: &Value) -> String {
        let header =
            json!({"alg": self.alg(), "kid": format!("bench-{}", self.alg()), "typ": "JWT"});
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match self {
            Self::Ed(k) => {
                use ed25519_dalek::Signer;
                k.sign(message.as_bytes()).to_bytes().to_vec()
            }
            Self::Rs(k) => {
                use rsa::signature::{SignatureEncoding, Signer};
                let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.clone());
                signer.sign(message.as_bytes()).to_vec()
            }
        };
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [command, alg, file] = args.as_slice() else {
        panic!("usage: bench_tokens jwks|sign EdDSA|RS256 <key file>");
    };
    match command.as_str() {
        "jwks" => println!("{}", json!({"keys": [Key::generate(alg, file).jwk()]})),
        "sign" => {
            let key = Key::load(alg, file);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            for line in std::io::stdin().lock().lines() {
                let line = line.unwrap();
                let mut fields = line.split_whitespace();
                let (Some(user), Some(_), Some(first)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let claims = json!({"sub": user, "iat": now, "exp": now + 7200});
                println!("{user} {} {first}", key.sign(&claims));
            }
        }
        other => panic!("unknown command {other}"),
    }
}
