//! etcd's user and password login, one code path for everything that talks to etcd: the etcd
//! source and the fleet's gateway. `/v3/auth/authenticate` gives a token, sent as
//! `Authorization` on every call; when etcd refuses it as expired (`--auth-token-ttl`) or as
//! older than the last change of users and roles, it is dropped, a new one is asked for, and
//! the call is made once more. Errors name the etcd address and the user, never the password.

use std::path::PathBuf;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Method, StatusCode, Uri};
use serde_json::{json, Value};

use super::client::{self, ClientError, HttpClient, Reply};
use super::source::server_says;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Said the way the etcd source always said it: "etcd HOST:PORT refused authentication as
    /// user NAME: ...".
    #[error("etcd {peer} refused authentication as user {user}: {message} (password from {option} {})", path.display())]
    Refused { peer: String, user: String, message: String, option: &'static str, path: PathBuf },
    #[error("etcd {peer} sent a malformed answer to authentication as user {user}: {message}")]
    Protocol { peer: String, user: String, message: String },
}

impl LoginError {
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, LoginError::Client(e) if e.is_timeout())
    }
}

/// A user, the file holding its password, and the token etcd gave for them.
pub(crate) struct EtcdLogin {
    base: Uri,
    user: String,
    password_file: PathBuf,
    /// The option that named `password_file` (`--source-password-file`, `--fleet-password-file`).
    option: &'static str,
    token: Option<HeaderValue>,
}

impl EtcdLogin {
    pub(crate) fn new(base: &Uri, user: &str, password_file: PathBuf, option: &'static str) -> EtcdLogin {
        EtcdLogin { base: base.clone(), user: user.to_owned(), password_file, option, token: None }
    }

    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    /// The token held now, if any (for a watch, which cannot be sent twice).
    pub(crate) fn current(&self) -> Option<HeaderValue> {
        self.token.clone()
    }

    /// Drops the token: the next call authenticates again.
    pub(crate) fn forget(&mut self) {
        self.token = None;
    }

    fn peer(&self) -> String {
        client::peer_of(&self.base)
    }

    /// The token to send, authenticating first when there is none. The password file is read
    /// for each authentication: a rotated password is used as soon as a token is needed again.
    pub(crate) async fn token(
        &mut self,
        client: &mut HttpClient,
        timeout: Duration,
    ) -> Result<HeaderValue, LoginError> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let password = client::read_secret(&self.password_file, self.option)?;
        let url = format!("{}v3/auth/authenticate", self.base);
        let uri: Uri =
            url.parse().map_err(|e: http::uri::InvalidUri| ClientError::Url { url, message: e.to_string() })?;
        let body = json!({ "name": self.user, "password": password.expose() }).to_string();
        let reply = client.fetch(client::request(Method::POST, &uri, body), timeout, 64 * 1024).await?;
        if !reply.status.is_success() {
            return Err(LoginError::Refused {
                peer: self.peer(),
                user: self.user.clone(),
                message: etcd_says(&reply.body, password.expose()),
                option: self.option,
                path: self.password_file.clone(),
            });
        }
        let protocol = |message: String| LoginError::Protocol { peer: self.peer(), user: self.user.clone(), message };
        let answer: Value = serde_json::from_slice(&reply.body).map_err(|e| protocol(format!("not JSON: {e}")))?;
        let mut token = answer
            .get("token")
            .and_then(Value::as_str)
            .and_then(|t| HeaderValue::from_str(t).ok())
            .ok_or_else(|| protocol("no usable token".into()))?;
        token.set_sensitive(true);
        tracing::debug!("etcd {}: authenticated as user {}", self.peer(), self.user);
        self.token = Some(token.clone());
        Ok(token)
    }
}

/// One POST to the gateway, with the login's token when there is a login; a token etcd
/// refuses as stale is replaced and the call made once more. Any other answer, success or
/// not, is the caller's to read.
pub(crate) async fn post(
    mut login: Option<&mut EtcdLogin>,
    client: &mut HttpClient,
    uri: &Uri,
    body: &str,
    timeout: Duration,
    max: u64,
) -> Result<Reply, LoginError> {
    let mut renewed = false;
    loop {
        let mut request = client::request(Method::POST, uri, body.to_owned());
        if let Some(login) = login.as_deref_mut() {
            request.headers_mut().insert(AUTHORIZATION, login.token(client, timeout).await?);
        }
        let reply = client.fetch(request, timeout, max).await?;
        if reply.status.is_success() {
            return Ok(reply);
        }
        match login.as_deref_mut() {
            // An expired token, or one from before a change of users or roles: once more
            // with a new one.
            Some(login) if !renewed && token_is_stale(reply.status, &etcd_says(&reply.body, "")) => {
                tracing::info!(
                    "etcd {}: the auth token of user {} was refused ({}); authenticating again",
                    login.peer(),
                    login.user,
                    etcd_says(&reply.body, "")
                );
                login.forget();
                renewed = true;
            }
            _ => return Ok(reply),
        }
    }
}

/// etcd's message in an error answer (`{"error": ..., "message": ...}`), without `secret`.
pub(crate) fn etcd_says(body: &[u8], secret: &str) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_owned));
    match message {
        Some(m) => server_says(m.as_bytes(), &[secret]),
        None => server_says(body, &[secret]),
    }
}

/// Whether etcd refused the token itself (expired, or older than the last change of users and
/// roles) rather than the user's rights: a new token may fix it.
pub(crate) fn token_is_stale(status: StatusCode, said: &str) -> bool {
    status == StatusCode::UNAUTHORIZED || said.contains("invalid auth token") || said.contains("auth store is old")
}

/// Whether a refusal is about authentication or rights (rather than, say, a bad request).
pub(crate) fn is_auth_refusal(status: StatusCode, said: &str) -> bool {
    matches!(status.as_u16(), 401 | 403)
        || ["permission denied", "auth", "user name is empty"].iter().any(|m| said.contains(m))
}
