use super::*;

fn compile() -> Redactor {
    let policy: RedactionPolicy =
        serde_yaml::from_str(include_str!("../../../policies/redaction.yaml"))
            .expect("shipped policy parses");
    Redactor::build(&policy).expect("shipped policy compiles")
}

static SHIPPED: std::sync::LazyLock<std::sync::Arc<Redactor>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(compile()));

/// The shipped policy, compiled once for all tests.
fn redactor() -> std::sync::Arc<Redactor> {
    SHIPPED.clone()
}

/// Deterministic pseudo-random characters from `alphabet` (no real secrets
/// in the repository, and no dictionary words that placeholders match).
fn chars(seed: u64, n: usize, alphabet: &str) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[(x % a.len() as u64) as usize]
        })
        .collect()
}

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const BASE64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const UPPER32: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const HEX: &str = "0123456789abcdef";
const DIGITS: &str = "0123456789";
const LOWER36: &str = "abcdefghijklmnopqrstuvwxyz0123456789";
const UPPER36: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const BECH32: &str = "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L";

/// One example per rule, embedded in ordinary text.
fn examples() -> Vec<(&'static str, String)> {
    vec![
        (
            "aws-access-key-id",
            format!("key id AKIA{} here", chars(1, 16, UPPER32)),
        ),
        (
            "aws-secret-access-key",
            format!("aws_secret_access_key = {}", chars(2, 40, ALNUM)),
        ),
        ("gcp-api-key", format!("AIza{}", chars(3, 35, ALNUM))),
        (
            "private-key",
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\n{}\n{}\n-----END RSA PRIVATE KEY-----",
                chars(4, 64, ALNUM),
                chars(5, 64, ALNUM)
            ),
        ),
        (
            "azure-storage-key",
            format!(
                "DefaultEndpointsProtocol=https;AccountKey={}==;",
                chars(6, 86, ALNUM)
            ),
        ),
        (
            "azure-ad-client-secret",
            format!("secret {}8Q~{}", chars(7, 3, ALNUM), chars(8, 34, ALNUM)),
        ),
        ("github-token", format!("ghp_{}", chars(9, 36, ALNUM))),
        (
            "github-fine-grained-pat",
            format!("github_pat_{}", chars(10, 82, ALNUM)),
        ),
        ("gitlab-token", format!("glpat-{}", chars(11, 20, ALNUM))),
        (
            "slack-token",
            format!(
                "xoxb-{}-{}",
                chars(12, 12, "0123456789"),
                chars(13, 24, ALNUM)
            ),
        ),
        (
            "slack-webhook-url",
            format!("https://hooks.slack.com/services/{}", chars(14, 44, ALNUM)),
        ),
        ("stripe-key", format!("sk_live_{}", chars(15, 24, ALNUM))),
        (
            "openai-api-key",
            format!(
                "sk-proj-{}T3BlbkFJ{}",
                chars(16, 40, ALNUM),
                chars(17, 40, ALNUM)
            ),
        ),
        (
            "anthropic-api-key",
            format!("sk-ant-api03-{}AA", chars(18, 93, ALNUM)),
        ),
        (
            "huggingface-token",
            format!("hf_{}", chars(19, 34, LETTERS)),
        ),
        ("npm-token", format!("npm_{}", chars(20, 36, ALNUM))),
        (
            "jwt",
            format!(
                "eyJ{}.eyJ{}.{}",
                chars(21, 20, ALNUM),
                chars(22, 30, ALNUM),
                chars(23, 30, ALNUM)
            ),
        ),
        (
            "connection-string",
            format!(
                "postgres://app:{}@db.internal:5432/app",
                chars(24, 16, ALNUM)
            ),
        ),
        (
            "password-assignment",
            format!("DB_PASSWORD={}", chars(25, 18, ALNUM)),
        ),
        (
            "bearer-token",
            format!("Authorization: Bearer {}", chars(26, 32, ALNUM)),
        ),
        ("email", "write to jane.doe@corp.example.org please".into()),
        ("credit-card", "card 4111 1111 1111 1111 on file".into()),
        ("us-ssn", "SSN 123-45-6789".into()),
        ("iban", "IBAN GB82 WEST 1234 5698 7654 32".into()),
        ("ipv4", "from 203.0.113.77 at noon".into()),
        ("ipv6", "host 2001:db8:85a3::8a2e:370:7334 up".into()),
        ("phone", "reach me on +44 20 7946 0958 today".into()),
        ("phone-nanp", "the office is (415) 555-0132 during the day".into()),
        ("phone-00", "from abroad dial 0044 20 7946 0958".into()),
        (
            "cli-password",
            format!("mysql -u root -p{} mydb", chars(329, 14, ALNUM)),
        ),
        ("phone-national", "Büro: 030 12345678 (Berlin)".into()),
        ("phone-labelled", "Phone: 612 34 56 78".into()),
        ("phone-labelled-after", "72 12 88 27 (mobile)".into()),
        (
            "credit-card-labelled",
            "charge the card ending in full 501864667909 please".into(),
        ),
        (
            "aws-bedrock-api-key",
            format!("ABSK{}=", chars(200, 131, BASE64)),
        ),
        (
            "gcp-service-account-key-id",
            format!(r#"{{"private_key_id": "{}"}}"#, chars(201, 40, HEX)),
        ),
        (
            "google-oauth-client-secret",
            format!("GOCSPX-{}", chars(202, 28, URL64)),
        ),
        (
            "google-oauth-access-token",
            format!("ya29.a0{}", chars(203, 120, URL64)),
        ),
        (
            "age-secret-key",
            format!("AGE-SECRET-KEY-1{}", chars(204, 58, BECH32)),
        ),
        (
            "azure-shared-access-key",
            format!(
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={}=",
                chars(205, 43, BASE64)
            ),
        ),
        (
            "azure-sas-signature",
            format!(
                "https://acct.blob.core.windows.net/c/f?sv=2022-11-02&sp=r&sig={}%3D",
                chars(206, 43, ALNUM)
            ),
        ),
        (
            "azure-openai-key",
            format!("AZURE_OPENAI_API_KEY={}", chars(207, 32, HEX)),
        ),
        (
            "azure-devops-pat",
            format!("azure_devops_pat: {}", chars(208, 52, "abcdefghijklmnopqrstuvwxyz234567")),
        ),
        ("alibaba-access-key-id", format!("LTAI{}", chars(209, 20, ALNUM))),
        ("tencent-secret-id", format!("AKID{}", chars(210, 32, ALNUM))),
        ("digitalocean-token", format!("dop_v1_{}", chars(211, 64, HEX))),
        ("heroku-api-key", format!("HRKU-AA{}", chars(212, 58, URL64))),
        (
            "heroku-api-key-uuid",
            format!(
                "HEROKU_API_KEY={}-{}-4{}-a{}-{}",
                chars(213, 8, HEX),
                chars(214, 4, HEX),
                chars(215, 3, HEX),
                chars(216, 3, HEX),
                chars(217, 12, HEX)
            ),
        ),
        (
            "cloudflare-api-token",
            format!("CLOUDFLARE_API_TOKEN=\"{}\"", chars(218, 40, URL64)),
        ),
        (
            "cloudflare-origin-ca-key",
            format!("v1.0-{}-{}", chars(219, 24, HEX), chars(220, 146, HEX)),
        ),
        ("fly-io-token", format!("fo1_{}", chars(221, 43, URL64))),
        ("netlify-token", format!("nfp_{}", chars(222, 36, ALNUM))),
        ("supabase-token", format!("sbp_{}", chars(223, 40, HEX))),
        ("planetscale-token", format!("pscale_tkn_{}", chars(224, 43, URL64))),
        ("bitbucket-app-password", format!("ATBB{}", chars(225, 32, ALNUM))),
        (
            "atlassian-api-token",
            format!("ATATT3xFfGF0{}", chars(226, 180, URL64)),
        ),
        (
            "circleci-token",
            format!("CCIPAT_{}_{}", chars(227, 22, ALNUM), chars(228, 40, HEX)),
        ),
        ("sourcegraph-token", format!("sgp_{}", chars(229, 40, HEX))),
        (
            "sourcegraph-token-assigned",
            format!("sourcegraph_token: {}", chars(230, 40, HEX)),
        ),
        ("clojars-token", format!("CLOJARS_{}", chars(231, 60, LOWER36))),
        ("linear-api-key", format!("lin_api_{}", chars(232, 40, ALNUM))),
        (
            "notion-token",
            format!("ntn_{}{}", chars(233, 11, DIGITS), chars(234, 35, ALNUM)),
        ),
        (
            "postman-api-key",
            format!("PMAK-{}-{}", chars(235, 24, HEX), chars(236, 34, HEX)),
        ),
        ("docker-hub-token", format!("dckr_pat_{}", chars(237, 27, URL64))),
        (
            "pypi-token",
            format!("pypi-AgEIcHlwaS5vcmc{}", chars(238, 120, URL64)),
        ),
        ("rubygems-token", format!("rubygems_{}", chars(239, 48, HEX))),
        ("nuget-api-key", format!("oy2{}", chars(240, 43, LOWER36))),
        ("jfrog-token", format!("AKCp{}", chars(241, 69, ALNUM))),
        ("sonarqube-token", format!("squ_{}", chars(242, 40, HEX))),
        ("octopus-deploy-api-key", format!("API-{}", chars(243, 26, UPPER36))),
        (
            "terraform-cloud-token",
            format!("{}.atlasv1.{}", chars(244, 14, ALNUM), chars(245, 67, URL64)),
        ),
        ("vault-token", format!("hvs.{}", chars(246, 95, URL64))),
        (
            "vault-token-legacy",
            format!("VAULT_TOKEN=s.{}", chars(247, 24, ALNUM)),
        ),
        ("pulumi-token", format!("pul-{}", chars(248, 40, HEX))),
        ("doppler-token", format!("dp.st.prd.{}", chars(249, 43, ALNUM)).replacen("prd.", "", 1)),
        (
            "1password-service-account-token",
            format!("ops_eyJ{}", chars(250, 300, BASE64)),
        ),
        (
            "1password-secret-key",
            format!(
                "A3-{}-{}-{}-{}-{}",
                chars(251, 6, UPPER36),
                chars(252, 11, UPPER36),
                chars(253, 5, UPPER36),
                chars(254, 5, UPPER36),
                chars(255, 5, UPPER36)
            ),
        ),
        (
            "kubernetes-client-key",
            format!("    client-key-data: LS0t{}=", chars(256, 200, BASE64)),
        ),
        (
            "discord-bot-token",
            format!(
                "client.run('MT{}.{}.{}')",
                chars(257, 24, ALNUM),
                chars(258, 6, URL64),
                chars(259, 38, URL64)
            ),
        ),
        (
            "discord-webhook-url",
            format!(
                "https://discord.com/api/webhooks/{}/{}",
                chars(260, 19, DIGITS),
                chars(261, 68, URL64)
            ),
        ),
        (
            "teams-webhook-url",
            format!(
                "https://contoso.webhook.office.com/webhookb2/{}@{}/IncomingWebhook/{}/{}",
                chars(262, 36, HEX),
                chars(263, 36, HEX),
                chars(264, 32, HEX),
                chars(265, 36, HEX)
            ),
        ),
        (
            "telegram-bot-token",
            format!("{}:AA{}", chars(266, 10, DIGITS), chars(267, 33, URL64)),
        ),
        ("twilio-api-key", format!("SK{}", chars(268, 32, HEX))),
        (
            "twilio-auth-token",
            format!("TWILIO_AUTH_TOKEN={}", chars(269, 32, HEX)),
        ),
        (
            "sendgrid-api-key",
            format!("SG.{}.{}", chars(270, 22, URL64), chars(271, 43, URL64)),
        ),
        ("mailgun-api-key", format!("key-{}", chars(272, 32, HEX))),
        (
            "mailchimp-api-key",
            format!("{}-us14", chars(273, 32, HEX)),
        ),
        (
            "brevo-api-key",
            format!("xkeysib-{}-{}", chars(274, 64, HEX), chars(275, 16, ALNUM)),
        ),
        ("stripe-webhook-secret", format!("whsec_{}", chars(276, 32, ALNUM))),
        ("square-token", format!("EAAA{}", chars(277, 60, URL64))),
        (
            "braintree-access-token",
            format!(
                "access_token$production${}${}",
                chars(278, 16, LOWER36),
                chars(279, 32, HEX)
            ),
        ),
        ("shopify-token", format!("shpat_{}", chars(280, 32, HEX))),
        (
            "plaid-access-token",
            format!(
                "access-production-{}-{}-{}-{}-{}",
                chars(281, 8, HEX),
                chars(282, 4, HEX),
                chars(283, 4, HEX),
                chars(284, 4, HEX),
                chars(285, 12, HEX)
            ),
        ),
        ("facebook-access-token", format!("EAAG{}", chars(286, 180, ALNUM))),
        ("sk-style-api-key", format!("sk-{}", chars(287, 32, HEX))),
        ("groq-api-key", format!("gsk_{}", chars(288, 52, ALNUM))),
        ("replicate-api-token", format!("r8_{}", chars(289, 37, ALNUM))),
        ("perplexity-api-key", format!("pplx-{}", chars(290, 48, ALNUM))),
        ("xai-api-key", format!("xai-{}", chars(291, 80, ALNUM))),
        (
            "cohere-api-key",
            format!("co = cohere.Client(api_key=\"{}\")", chars(292, 40, ALNUM)).replace("co = cohere.Client(api_key", "COHERE_API_KEY"),
        ),
        (
            "mistral-api-key",
            format!("export MISTRAL_API_KEY={}", chars(293, 32, ALNUM)),
        ),
        (
            "langsmith-api-key",
            format!("lsv2_pt_{}_{}", chars(294, 32, HEX), chars(295, 10, HEX)),
        ),
        (
            "pinecone-api-key",
            format!("pcsk_{}_{}", chars(296, 6, ALNUM), chars(297, 64, ALNUM)),
        ),
        ("databricks-token", format!("dapi{}", chars(298, 32, HEX))),
        (
            "datadog-api-key",
            format!("DD_API_KEY={}", chars(299, 32, HEX)),
        ),
        ("new-relic-key", format!("NRAK-{}", chars(300, 27, UPPER36))),
        ("sentry-token", format!("sntryu_{}", chars(301, 64, HEX))),
        (
            "grafana-token",
            format!("glsa_{}_{}", chars(302, 32, ALNUM), chars(303, 8, HEX)),
        ),
        (
            "dynatrace-token",
            format!("dt0c01.{}.{}", chars(304, 24, UPPER36), chars(305, 64, UPPER36)),
        ),
        (
            "okta-api-token",
            format!("OKTA_API_TOKEN=00{}", chars(306, 40, URL64)),
        ),
        (
            "snyk-token",
            format!(
                "SNYK_TOKEN={}-{}-{}-{}-{}",
                chars(307, 8, HEX),
                chars(308, 4, HEX),
                chars(309, 4, HEX),
                chars(310, 4, HEX),
                chars(311, 12, HEX)
            ),
        ),
        (
            "mapbox-secret-token",
            format!("sk.eyJ{}.{}", chars(312, 60, URL64), chars(313, 22, URL64)),
        ),
        (
            "airtable-token",
            format!("pat{}.{}", chars(314, 14, ALNUM), chars(315, 64, HEX)),
        ),
        ("contentful-token", format!("CFPAT-{}", chars(316, 43, URL64))),
        ("figma-token", format!("figd_{}", chars(317, 40, URL64))),
        ("clickhouse-cloud-key", format!("4b1d{}", chars(318, 38, ALNUM))),
        (
            "intra42-client-secret",
            format!("s-s4t2ud-{}", chars(319, 64, HEX)),
        ),
        (
            "maxmind-license-key",
            format!("{}_{}_mmk", chars(320, 6, ALNUM), chars(321, 29, ALNUM)),
        ),
        ("prefect-token", format!("pnu_{}", chars(322, 36, ALNUM))),
        ("readme-token", format!("rdme_{}", chars(323, 70, LOWER36))),
        ("infracost-token", format!("ico-{}", chars(324, 32, ALNUM))),
        (
            "secret-assignment",
            format!("  client_secret: \"{}\"", chars(325, 24, URL64)),
        ),
        (
            "key-assignment",
            format!("STRIPE_KEY={}", chars(326, 32, ALNUM)),
        ),
        (
            "config-key-value",
            format!(
                "<add key=\"DbPassword\" value=\"{}\" />",
                chars(340, 16, ALNUM)
            ),
        ),
        (
            "http-header-credential",
            format!("curl -H \"Authorization: Token {}\" https://api", chars(327, 24, ALNUM)),
        ),
        (
            "curl-basic-auth",
            format!("curl -u admin:{} https://db.internal:9200", chars(328, 14, ALNUM)),
        ),
    ]
}

/// Rules a profile turns on, each with an example.
fn profile_examples() -> Vec<(&'static str, String)> {
    vec![
        ("date-of-birth", "DOB: 04/07/1981, admitted Tuesday".into()),
        ("us-medicare-mbi", "MBI 1EG4-TE5-MK73 on file".into()),
    ]
}

/// One look-alike per rule: text that resembles what the rule finds and
/// must survive untouched (nothing in it is a finding).
fn look_alikes() -> Vec<(&'static str, String)> {
    vec![
        ("aws-access-key-id", "AKIAIOSFODNN7EXAMPLE is AWS's documented example".into()),
        ("aws-secret-access-key", "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}".into()),
        ("aws-bedrock-api-key", format!("ABSK{} is too short", chars(400, 40, ALNUM))),
        ("gcp-api-key", "AIzaSyabcdefghijklmnopqrstuvwxyz1234567 is made up".into()),
        ("gcp-service-account-key-id", r#"{"private_key_id": "k"}"#.into()),
        ("google-oauth-client-secret", "GOCSPX-<client-secret>".into()),
        ("google-oauth-access-token", "ya29.<access-token>".into()),
        ("private-key", "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----".into()),
        ("age-secret-key", format!("age1{} is a public recipient", chars(401, 58, "qpzry9x8gf2tvdw0s3jn54khce6mua7l"))),
        ("azure-storage-key", "AccountKey=<storage-account-key>;".into()),
        ("azure-shared-access-key", "SharedAccessKeyName=RootManageSharedAccessKey;".into()),
        ("azure-sas-signature", "append ?sig=<signature> to the URL".into()),
        ("azure-ad-client-secret", "the value looks like abc8Q~ followed by 34 characters".into()),
        ("azure-openai-key", "AZURE_OPENAI_ENDPOINT=https://contoso.openai.azure.com/".into()),
        ("azure-devops-pat", "azure_devops_pat: $(System.AccessToken)".into()),
        ("alibaba-access-key-id", "LTAI is the prefix of Alibaba access key ids".into()),
        ("tencent-secret-id", "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE".into()),
        ("digitalocean-token", "dop_v1_ followed by 64 hex characters".into()),
        ("heroku-api-key", "HRKU-AA<token>".into()),
        ("heroku-api-key-uuid", "heroku_app_name: my-app-staging".into()),
        ("cloudflare-api-token", "CLOUDFLARE_ZONE=example-zone".into()),
        ("cloudflare-origin-ca-key", format!("v1.0-{} is truncated", chars(402, 24, HEX))),
        ("fly-io-token", "fly tokens start with fo1_ or fm2_".into()),
        ("netlify-token", "nfp_ then 36 characters".into()),
        ("supabase-token", format!("sbp_{}", chars(403, 12, HEX))),
        ("planetscale-token", "pscale_tkn_ is the prefix".into()),
        ("bitbucket-app-password", "ATBB then the rest".into()),
        ("atlassian-api-token", "ATATT3xFfGF0 then about 180 characters".into()),
        ("circleci-token", "CCIPAT_ prefixed tokens".into()),
        ("sourcegraph-token", "sgp_local_ is the prefix".into()),
        ("sourcegraph-token-assigned", "sourcegraph_url: https://sourcegraph.com".into()),
        ("clojars-token", "CLOJARS_USERNAME=builder".into()),
        ("linear-api-key", "lin_api_ keys are 40 characters".into()),
        ("notion-token", "ntn_12345 is not a token".into()),
        ("postman-api-key", "PMAK-<your-key>".into()),
        ("docker-hub-token", "dckr_pat_ then 27 characters".into()),
        ("npm-token", "npm_config_registry=https://registry.npmjs.org".into()),
        ("pypi-token", "pypi-AgEIcHlwaS5vcmc then the rest".into()),
        ("rubygems-token", "rubygems_api_key: ${RUBYGEMS_KEY}".into()),
        ("nuget-api-key", "oy2 is the prefix of NuGet keys".into()),
        ("jfrog-token", "AKCp then 69 characters".into()),
        ("sonarqube-token", "squ_ then 40 hex characters".into()),
        ("octopus-deploy-api-key", "API-KEY-REQUIRED is the error".into()),
        ("terraform-cloud-token", "token = \"xxxxxxxxxxxxxx.atlasv1.xxxxxxxx\"".into()),
        ("vault-token", "hvs. tokens are long".into()),
        ("vault-token-legacy", "VAULT_TOKEN=s.xxxxxxxxxxxxxxxxxxxxxxxx".into()),
        ("pulumi-token", "pul- then 40 hex characters".into()),
        ("doppler-token", "dp.st. then 43 characters".into()),
        ("1password-service-account-token", "export OP_SERVICE_ACCOUNT_TOKEN=ops_eyJ...".into()),
        ("1password-secret-key", "A3-XXXXXX-XXXXXXXXXXX-XXXXX-XXXXX-XXXXX".into()),
        ("kubernetes-client-key", "    client-key-data: REDACTED".into()),
        ("discord-bot-token", "see docs.discord.com/developers.html.example for the token".into()),
        ("discord-webhook-url", "https://discord.com/api/webhooks/<id>/<token>".into()),
        ("teams-webhook-url", "https://contoso.webhook.office.com/webhookb2/...".into()),
        ("telegram-bot-token", "at 12:30:AA the bot 123456789 started".into()),
        ("twilio-api-key", format!("SK{} is too short", chars(404, 16, HEX))),
        ("twilio-auth-token", format!("TWILIO_ACCOUNT_SID=AC{}", chars(405, 32, HEX))),
        ("sendgrid-api-key", "SG.xxxxxxxx.yyyyyyyy".into()),
        ("mailgun-api-key", "key-value stores such as key-0123".into()),
        ("mailchimp-api-key", "the us-east-1 region".into()),
        ("brevo-api-key", "xkeysib- then the key".into()),
        ("stripe-key", "sk_live_xxxxxxxxxxxxxxxxxxxxxxxx".into()),
        ("stripe-webhook-secret", "whsec_... from the dashboard".into()),
        ("square-token", "EAAA then 60 characters".into()),
        ("braintree-access-token", "access_token$production$<merchant>$<key>".into()),
        ("shopify-token", "shpat_ then 32 hex characters".into()),
        ("plaid-access-token", "access-production- then a UUID".into()),
        ("facebook-access-token", "EAAB tokens are long; 100 | 200 is a table".into()),
        ("openai-api-key", "sk-proj-... from the OpenAI dashboard".into()),
        ("anthropic-api-key", "sk-ant-api03-... from the console".into()),
        ("sk-style-api-key", "the sk-learn package".into()),
        ("groq-api-key", "gsk_ then 52 characters".into()),
        ("replicate-api-token", "r8_ then 37 characters".into()),
        ("perplexity-api-key", "pplx-<key>".into()),
        ("xai-api-key", "xai-grok is a model family".into()),
        ("cohere-api-key", "COHERE_API_KEY=os.environ[\"COHERE_API_KEY\"]".into()),
        ("mistral-api-key", "mistral_model: mistral-large-latest".into()),
        ("huggingface-token", "hf_hub_download(repo_id=\"x\")".into()),
        ("langsmith-api-key", "lsv2_pt_ then the key".into()),
        ("pinecone-api-key", "pcsk_ then the key".into()),
        ("databricks-token", "dapi then 32 hex characters".into()),
        ("datadog-api-key", "DD_API_KEY=${DD_API_KEY}".into()),
        ("new-relic-key", "NRAK-<key>".into()),
        ("sentry-token", "sntryu_ then 64 hex characters".into()),
        ("grafana-token", "glsa_ then the key".into()),
        ("dynatrace-token", "dt0c01.<id>.<secret>".into()),
        ("okta-api-token", format!("rookTable = 00{}", chars(406, 40, ALNUM))),
        ("snyk-token", "SNYK_ORG=my-org".into()),
        ("mapbox-secret-token", "sk.eyJ... from the account page".into()),
        ("airtable-token", "the path.to.file".into()),
        ("contentful-token", "CFPAT- then 43 characters".into()),
        ("figma-token", "figd_ then the key".into()),
        ("clickhouse-cloud-key", "4b1d is a hex word".into()),
        ("intra42-client-secret", "s-s4t2ud- then 64 hex characters".into()),
        ("maxmind-license-key", "the file GeoLite2_mmk".into()),
        ("prefect-token", "pnu_ then 36 characters".into()),
        ("readme-token", "rdme_ then 70 characters".into()),
        ("infracost-token", format!("video_box.ico-{}.png", chars(407, 32, ALNUM))),
        ("github-token", "ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into()),
        ("github-fine-grained-pat", "github_pat_<token>".into()),
        ("gitlab-token", "glpat-xxxxxxxxxxxxxxxxxxxx".into()),
        ("slack-token", "xoxb-12345-abcd234".into()),
        ("slack-webhook-url", "https://hooks.slack.com/services/T000/B000/XXXX".into()),
        ("jwt", "eyJhbGciOiJIUzI1NiJ9 alone is only a header".into()),
        ("connection-string", "postgres://app:${DB_PASSWORD}@db:5432/app".into()),
        ("password-assignment", "password: ${DB_PASSWORD}".into()),
        ("password-assignment", "passport_number = X123456789".into()),
        ("secret-assignment", "max_tokens: 4096, token_count = 1234567890123".into()),
        ("config-key-value", "<add key=\"DbPassword\" value=\"$(DB_PASSWORD)\" />".into()),
        ("key-assignment", "public_key = \"9Cnzj4p4WGeKLs1Pt8QuKUpRKfFLfRYC9AIKjbJTWit\"".into()),
        ("bearer-token", "Authorization: Bearer $API_KEY".into()),
        ("http-header-credential", "-H \"Authorization: Bearer <token>\"".into()),
        ("curl-basic-auth", "curl -u \"$USERNAME:$PASSWORD\" https://api".into()),
        ("email", "write to support at example dot com".into()),
        ("credit-card", "order 2024 1234 5678 9012 shipped".into()),
        ("credit-card-labelled", "card 4111 1111 1111 1112 fails Luhn".into()),
        ("us-ssn", "SSN 666-12-3456 is invalid".into()),
        ("iban", "IBAN GB82WEST12345698765431 fails mod-97".into()),
        ("ipv4", "listen on 127.0.0.1 and 0.0.0.0".into()),
        ("ipv6", "a::b is Rust, not IPv6".into()),
        ("phone", "version +1.2.3 and 2+2=4".into()),
        ("phone-nanp", "invoice 123-456-7890 (area code 123 is not assigned)".into()),
        ("phone-national", "it was 2000-04-16 11:34:35 then".into()),
        ("phone-labelled", "call me in 2 days".into()),
        ("phone-00", "account 0000 1234 and 007 agents".into()),
        ("cli-password", "mysql -u root -p mydb prompts for it; redis-cli -a $REDIS_PASSWORD".into()),
        ("phone-labelled-after", "3747 3911 fourth avenue, home of the team".into()),
        ("date-of-birth", "born to run, 1975".into()),
        ("us-medicare-mbi", "order 1EG4-TE5 shipped".into()),
    ]
}

/// A PEM block of `lines` full lines of 64 base64 characters (with `+`
/// and `/`) and a short last line, as real keys are written.
fn pem(label: &str, seed: u64, lines: usize) -> String {
    let mut body: Vec<String> = (0..lines)
        .map(|i| chars(seed + i as u64, 64, BASE64))
        .collect();
    body.push(format!("{}==", chars(seed + 999, 22, BASE64)));
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----",
        body.join("\n")
    )
}

/// Each rule's longest realistic value (longer than the stream redactor's
/// hold-back wherever the format allows it).
fn long_examples() -> Vec<(&'static str, String)> {
    vec![
        ("private-key", pem("RSA PRIVATE KEY", 100, 6)),
        ("private-key", pem("PRIVATE KEY", 200, 50)),
        ("private-key", pem("EC PRIVATE KEY", 300, 2)),
        // OpenSSH keys hold runs of zero bytes: `AAAAAAAA` is real data.
        (
            "private-key",
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n{}\n{}\n-----END OPENSSH PRIVATE KEY-----",
                chars(301, 70, BASE64),
                chars(302, 70, BASE64)
            ),
        ),
        ("github-token", format!("gho_{}", chars(101, 255, ALNUM))),
        ("gitlab-token", format!("glpat-{}", chars(102, 64, ALNUM))),
        (
            "slack-token",
            format!("xoxe.xoxp-1-{}", chars(103, 200, ALNUM)),
        ),
        ("stripe-key", format!("sk_live_{}", chars(104, 99, ALNUM))),
        (
            "openai-api-key",
            format!(
                "sk-proj-{}T3BlbkFJ{}",
                chars(105, 200, URL64),
                chars(106, 200, URL64)
            ),
        ),
        (
            "jwt",
            format!(
                "eyJ{}.eyJ{}.{}",
                chars(107, 400, ALNUM),
                chars(108, 1500, ALNUM),
                chars(109, 342, URL64)
            ),
        ),
        (
            "connection-string",
            format!(
                "mongodb+srv://svc:{}@cluster0.internal.example.net/db",
                chars(110, 256, ALNUM)
            ),
        ),
        (
            "password-assignment",
            format!("DB_PASSWORD={}", chars(111, 200, ALNUM)),
        ),
        (
            "bearer-token",
            format!("Authorization: Bearer {}", chars(112, 900, URL64)),
        ),
        (
            "slack-webhook-url",
            format!("https://hooks.slack.com/services/{}", chars(113, 56, ALNUM)),
        ),
    ]
}

fn shipped_policy() -> RedactionPolicy {
    serde_yaml::from_str(include_str!("../../../policies/redaction.yaml")).unwrap()
}

static EVERYTHING: std::sync::LazyLock<Redactor> = std::sync::LazyLock::new(|| {
    let mut policy = shipped_policy();
    policy.rules.iter_mut().for_each(|r| r.enabled = true);
    Redactor::build(&policy).unwrap()
});

/// The shipped rules with every rule on, compiled once.
fn everything() -> &'static Redactor {
    &EVERYTHING
}

#[test]
fn every_rule_has_an_example_and_a_look_alike() {
    let policy = shipped_policy();
    let examples: Vec<_> = examples().into_iter().chain(profile_examples()).collect();
    let look_alikes = look_alikes();
    for rule in &policy.rules {
        assert!(
            examples.iter().any(|(id, _)| *id == rule.id),
            "no example for rule {}",
            rule.id
        );
        assert!(
            look_alikes.iter().any(|(id, _)| *id == rule.id),
            "no look-alike for rule {}",
            rule.id
        );
    }
    let every = everything();
    let mut wrong = Vec::new();
    for (id, text) in &examples {
        let (out, counts) = every.redact(text);
        let tag = format!("[REDACTED:{}]", every.entity(id));
        if counts.get(*id) != Some(&1) || !out.contains(&tag) {
            wrong.push(format!("{id}: {text:?} -> {out:?} ({counts:?})"));
        }
    }
    for (id, text) in &look_alikes {
        let (out, counts) = every.redact(text);
        if !counts.is_empty() {
            wrong.push(format!("{id} look-alike: {text:?} -> {out:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// What an assistant writes when it shows how to configure a credential
/// without one: references, lookups, templates, masks and stock
/// placeholders, in every syntax a reply uses. None is redacted.
/// Values that only look like references at their start, assigned in
/// every way the assignment rules know, are still redacted; so is what
/// follows an assignment the rules reject.
#[test]
fn values_are_redacted_whatever_they_start_with() {
    let r = redactor();
    let cases = [
        "password: \"#Summer2024!x\"",
        "DB_PASSWORD='@dm1nP4ss2024'",
        "password: Summer2024.Winter",
        "password: correct_horse_battery_staple",
        "password: HUNTER2-PROD-2024",
        "POSTGRES_PASSWORD=5f4dcc3b5aa765d61d8327deb882cf99",
        "postgres://app:%21Pg2024secret@pg-primary:5432/app",
        "mysql://root:#R00tPassw0rd@db-1:3306/app",
        "curl -u admin:@dm1nP4ss99 https://api.example.com",
        "Authorization: Bearer /k3JfA9xQ2mZ7rT4vB8nC6wE1yU5iO0pL",
        "https://app.example.com/cb?token_type=bearer&access_token=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5",
        "https://app.example.com/?password_reset=true&password=Hunt3r2Secret!x",
        "https://app.example.com/?token=changeme&secret=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5",
        "AIRFLOW__API__AUTH_TOKEN=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5",
        "Authentication__Google__ClientSecret=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5",
        "spring_datasource_primary_db_admin_password=S3cr3tP4ssw0rd!",
        "ApplicationConfigurationPrefix_PASSWORD=S3cr3tP4ssw0rd!",
        "REPUBLIC_BANK_API_KEY=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5",
        "request failed for api_key=Qx7vK2pL9mN4rT8wZ3yB6cF1hJ5: 401",
        "curl -d '{\\\"password\\\": \\\"S3cr3tP4ssw0rd!\\\"}' https://api",
        "password: ThereIsNoSpoon42",
        "<add key=\"DbPassword\" value=\"S3cr3tP4ssw0rd!\" />",
    ];
    let mut missed = Vec::new();
    for text in cases {
        if r.find(text).iter().all(|f| f.kind != Kind::Secret) {
            missed.push(text);
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
}

/// Placeholder words occur by chance inside long random values: a key
/// holding `here` or `xxxx` is still a key.
#[test]
fn placeholder_words_inside_long_keys_do_not_save_them() {
    let r = redactor();
    let body: String = (0..24)
        .map(|i| chars(900 + i, 64, URL64).replace(['-', '_'], "A"))
        .collect::<Vec<_>>()
        .join("\n");
    let (head, tail) = body.split_at(700);
    let key = format!(
        "-----BEGIN RSA PRIVATE KEY-----\n{head}RHERExxxx{tail}\n-----END RSA PRIVATE KEY-----"
    );
    let (out, counts) = r.redact(&key);
    assert!(!counts.is_empty() && !out.contains("RHERE"), "{out}");
}

#[test]
fn placeholders_and_references_survive() {
    let values = [
        "${DB_PASSWORD}",
        "${DB_PASSWORD:-}",
        "$PASSWORD",
        "$API_KEY",
        "%API_KEY%",
        "<YOUR_API_KEY>",
        "<your-token-here>",
        "{{ secrets.TOKEN }}",
        "{{ .Values.password }}",
        "${{ secrets.GITHUB_TOKEN }}",
        "process.env.API_KEY",
        "os.environ[\"TOKEN\"]",
        "os.getenv(\"OPENAI_API_KEY\")",
        "ENV[\"STRIPE_SECRET_KEY\"]",
        "settings.SECRET_KEY",
        "config.get('auth.token')",
        "$(vault kv get -field=password secret/db)",
        "********",
        "••••••••",
        "changeme",
        "change-me-please",
        "your-api-key-here",
        "YOUR_API_KEY_HERE",
        "replace_me_with_a_real_key",
        "sk-...",
        "xxxxxxxxxxxxxxxxxxxxxxxx",
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "DB_PASSWORD",
        "/run/secrets/db_password",
        "./certs/client.key",
        "https://vault.internal/v1/secret/data/app",
    ];
    let templates = [
        "password: {}",
        "DB_PASSWORD={}",
        "export API_TOKEN={}",
        "\"api_key\": \"{}\"",
        "client_secret = \"{}\"",
        "const apiKey = {};",
        "STRIPE_KEY={}",
        "Authorization: Bearer {}",
        "curl -u admin:{} https://api",
        "aws_secret_access_key = {}",
    ];
    let r = redactor();
    let mut wrong = Vec::new();
    for t in templates {
        for v in values {
            let text = t.replace("{}", v);
            let (out, counts) = r.redact(&text);
            if !counts.is_empty() {
                wrong.push(format!("{text:?} -> {out:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The same syntaxes with a real-looking value are redacted.
#[test]
fn assignments_in_every_syntax_are_redacted() {
    let value = chars(500, 28, ALNUM);
    let r = redactor();
    for text in [
        format!("password: {value}"),
        format!("  db_password: \"{value}\""),
        format!("DB_PASSWORD={value}"),
        format!("export API_TOKEN={value}"),
        format!("export API_TOKEN=\"{value}\""),
        format!("{{\"api_key\": \"{value}\"}}"),
        format!("client_secret = '{value}'"),
        format!("const apiKey = \"{value}\";"),
        format!("apiToken := \"{value}\""),
        format!("'secret' => '{value}',"),
        format!("STRIPE_KEY={value}"),
        format!("<add key=\"x\" value=\"y\" /> token: {value}"),
        format!("DB_PASS={value}"),
        format!("PGPASSWORD={value} psql -h db"),
        format!("<password>{value}</password>"),
        format!("//registry.npmjs.org/:_authToken={value}"),
        format!("redis-cli -h cache -a {value} ping"),
        format!("sshpass -p '{value}' ssh host"),
        format!("secret_key_base: {}", chars(501, 128, HEX)),
        format!("api_token = \"{}\"", chars(502, 32, HEX)),
        // A name right after another name's operator is not its value.
        format!("token:   client_secret: \"{value}\""),
        format!("password: api_key={value}"),
    ] {
        let (out, counts) = r.redact(&text);
        assert!(
            !counts.is_empty() && !out.contains(&value),
            "{text:?} -> {out:?}"
        );
    }
}

/// Phone numbers and cards in the forms people write them, and the
/// numbers that look like them but are not.
#[test]
fn phone_numbers_and_cards_as_written() {
    let r = redactor();
    let phones = [
        "+49 30 1234567",
        "+44 20 7946 0958",
        "+33 1 23 45 67 89",
        "+1 (415) 555-0132",
        "+39 06 1234 5678",
        "+34 912 345 678",
        "+48 22 123 45 67",
        "+31 20 123 4567",
        "+46 (0)8 928 571 38",
        "+4915123456789",
        "(415) 555-0132",
        "415-555-0132",
        "415.555.0132",
        "1-800-555-0199",
        "030 1234567",
        "(030) 12345678",
        "030/1234567",
        "0151 23456789",
        "01 23 45 67 89",
        "06.12.34.56.78",
        "020 7946 0958",
        "07700 900123",
        "06 1234 5678",
        "020 123 4567",
    ];
    for p in phones {
        let text = format!("reach me at {p} today");
        let f = r.find(&text);
        assert!(
            f.len() == 1 && &text[f[0].start..f[0].end] == p && r.entity(&f[0].rule) == "phone",
            "{p}: {f:?}"
        );
    }
    // National forms without a trunk 0 only with a label.
    for (text, p) in [
        ("Tel.: 912 345 678", "912 345 678"),
        ("telefon 22 123 45 67", "22 123 45 67"),
        ("mobile: 612 34 56 78", "612 34 56 78"),
    ] {
        let f = r.find(text);
        assert!(
            f.len() == 1 && &text[f[0].start..f[0].end] == p,
            "{text}: {f:?}"
        );
    }
    let cards = [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555 5555 5555 4444",
        "3782 822463 10005",
        "6011 0009 9013 9424",
    ];
    for c in cards {
        let text = format!("paid with {c} yesterday");
        let f = r.find(&text);
        assert!(
            f.len() == 1 && &text[f[0].start..f[0].end] == c && f[0].rule == "credit-card",
            "{c}: {f:?}"
        );
    }
    for text in [
        "it was 2000-04-16 11:34:35 then",
        "on 12.03.2024 at 10:30",
        "370 3911 Fourth Avenue, Suite 697",
        "order 2024 1234 5678 shipped",
        "invoice 0000 0000 0000 0000",
        "Luhn-valid but grouped oddly: 4111 11 1111 111111",
        "4111 1111-1111 1111 mixes separators",
        "ISBN 978-3-16-148410-0",
        "version 10.4.2.1 and build 2024.11.22",
        "room 101, floor 3, 25 people, 1200 dollars",
        "zip 94103 and 10115 Berlin",
        "the ratio 16:9 at 23:59:59",
        "3 + 4 = 7 and 2+2=4",
        "reference 123456789",
    ] {
        let f = r.find(text);
        assert!(f.is_empty(), "{text:?}: {f:?}");
    }
}

#[test]
fn rules_off_by_default_stay_off() {
    let r = redactor();
    for (id, text) in profile_examples() {
        assert!(r.find(&text).is_empty(), "{id} is on by default: {text}");
    }
}

#[test]
fn the_secret_never_survives_only_the_span_is_replaced() {
    let r = redactor();
    let key = format!("ghp_{}", chars(40, 36, ALNUM));
    let (out, _) = r.redact(&format!("before {key} after"));
    assert_eq!(out, "before [REDACTED:github-token] after");
    let pw = chars(41, 20, ALNUM);
    let (out, _) = r.redact(&format!("password: {pw}"));
    assert_eq!(out, "password: [REDACTED:password-assignment]");
}

#[test]
fn gcp_service_account_json_key_is_redacted() {
    let r = redactor();
    let key_body = format!("{}\\n{}", chars(60, 64, ALNUM), chars(61, 64, ALNUM));
    let json = format!(
        r#"{{"type": "service_account", "project_id": "p", "private_key_id": "k",
"private_key": "-----BEGIN PRIVATE KEY-----\\n{key_body}\\n-----END PRIVATE KEY-----\\n", "client_email": "svc@p.iam.gserviceaccount.com"}}"#
    );
    let (out, counts) = r.redact(&json);
    assert_eq!(counts.get("private-key"), Some(&1), "{out}");
    assert!(!out.contains(&key_body[..20]));
}

#[test]
fn placeholders_and_look_alikes_survive() {
    let r = redactor();
    for text in [
        "AKIAIOSFODNN7EXAMPLE is the documented example key",
        "request 123e4567-e89b-12d3-a456-426614174000 done",
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "upgrade to version 10.4.2 or v2.31.0-rc.1",
        "password = xxxxxxxxxxxxxxxx",
        "api_key: <your-api-key>",
        "token = 1234567890abcdef1234567890abcdef",
        "it costs 1200 dollars for 12 people on 2026-11-22",
        "the answer is 42 and pi is 3.14159",
        "card 4111 1111 1111 1112 fails Luhn",
        "SSN 666-12-3456 and 000-12-3456 are invalid",
        "IBAN GB82WEST12345698765431 fails mod-97",
        "999.10.10.10 is not an address",
        "a::b is Rust, not IPv6; neither is 10:30",
        "AIzaSyabcdefghijklmnopqrstuvwxyz1234567 is made up",
        "ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let (out, counts) = r.redact(text);
        assert!(counts.is_empty(), "{text:?} -> {out:?} {counts:?}");
    }
}

#[test]
fn replacement_styles() {
    let text = "card 4111 1111 1111 1111 and ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";
    let with = |style: &str| {
        let mut policy: RedactionPolicy =
            serde_yaml::from_str(include_str!("../../../policies/redaction.yaml")).unwrap();
        policy.style = serde_yaml::from_str(style).unwrap();
        policy.salt = Some("pepper".into());
        Redactor::build(&policy).unwrap().redact(text).0
    };
    assert_eq!(with("kind"), "card [REDACTED:pii] and [REDACTED:secret]");
    assert_eq!(
        with("mask"),
        "card ***************1111 and ************************************Uo5i"
    );
    let hashed = with("hash");
    assert!(
        hashed.starts_with("card [REDACTED:credit-card:")
            && hashed.contains("[REDACTED:github-token:"),
        "{hashed}"
    );
    assert_eq!(hashed, with("hash"), "the same value gives the same tag");
    assert!(!hashed.contains("4111") && !hashed.contains("ghp_"));
}

#[test]
fn validators() {
    assert!(luhn("4111111111111111"));
    assert!(!luhn("4111111111111112"));
    assert!(mod97("GB82WEST12345698765432"));
    assert!(!mod97("GB82WEST12345698765431"));
    assert!(ssn("123-45-6789"));
    assert!(!ssn("900-45-6789"));
    assert!(entropy("aaaaaaaa") < 0.1);
    assert!(entropy(&chars(50, 40, ALNUM)) > 4.5);
}

#[test]
fn bad_rules_and_profiles_are_all_reported() {
    let policy: RedactionPolicy = serde_yaml::from_str(
        r#"
rules:
  - { id: a, kind: secret, pattern: "(" }
  - { id: b, kind: pii, pattern: "x", group: 2 }
  - { id: c, kind: secret, pattern: "x", exclude: "[" }
  - { id: d, kind: secret, assigned_to: [token], pattern: "x", group: 1 }
  - { id: d, kind: secret, pattern: "y" }
profiles:
  p: { disable: [no-such-rule] }
tenants: { t1: p, t2: missing }
"#,
    )
    .unwrap();
    let errors = Redactor::build(&policy).err().unwrap();
    assert_eq!(errors.len(), 7, "{errors:#?}");
}

/// No piece of a number survives when it touches another finding: a
/// number that runs into a secret (the greedy phone pattern takes the
/// first digit of the token after it), a number that starts inside a
/// secret's match, a stray number before a card. Every digit-checked
/// example before and after every secret example that starts or ends with
/// a digit, and the reviewed cases as they are; each also streamed, with
/// 300 bytes of prose on either side so the stream releases before its
/// end.
#[test]
fn no_piece_of_a_number_survives_next_to_another_finding() {
    let r = redactor();
    let numbers = [
        "Phone: 612 34 56 78",
        "mobile: +44 20 7946 0958",
        "card 4111 1111 1111 1111",
    ];
    let secrets: Vec<String> = examples()
        .into_iter()
        .filter(|(id, v)| {
            (v.starts_with(|c: char| c.is_ascii_digit())
                || v.ends_with(|c: char| c.is_ascii_digit()))
                && r.find(v)
                    .iter()
                    .any(|f| f.rule == *id && f.kind == Kind::Secret)
        })
        .map(|(_, v)| v)
        .collect();
    assert!(!secrets.is_empty());
    let mut texts: Vec<(String, Vec<String>)> = Vec::new();
    for n in numbers {
        let (alone, _) = r.redact(n);
        assert_ne!(alone, n, "{n} is redacted on its own");
        let tail = n.split(' ').next_back().unwrap_or(n).to_string();
        for s in &secrets {
            texts.push((format!("{n} {s}"), vec![tail.clone(), s.clone()]));
            texts.push((format!("{s} {n}"), vec![tail.clone(), s.clone()]));
        }
    }
    // Found by review and by the property test: each leaked a number,
    // whole or in part.
    texts.push((
        "the IBAN GB82 WEST 1234 5698 7654 32 the IBAN GB82 WEST 1234 5698 7654 32 call".into(),
        vec!["5698 7654".into()],
    ));
    texts.push((
        "tel sk_live_RqZxWvTmKp7 612 34 56 78".into(),
        vec!["34 56 78".into()],
    ));
    texts.push((
        "order 12 4111 1111 1111 1111".into(),
        vec!["4111".into(), "1111 1111".into()],
    ));
    let prose = "The quarterly report is attached; the figures are final. ".repeat(6);
    for (text, hidden) in &texts {
        let findings = r.find(text);
        for w in findings.windows(2) {
            assert!(
                w[0].end <= w[1].start,
                "findings overlap or are out of order in {text:?}"
            );
        }
        let (out, _) = r.redact(text);
        for h in hidden {
            assert!(
                !out.contains(h.as_str()),
                "{h:?} survived in {out:?} (from {text:?})"
            );
        }
        let long = format!("{prose}{text} {prose}");
        let (whole, _) = r.redact(&long);
        for n in [1, 3, 7, 16, 64] {
            let streamed = streaming::stream(&r, &streaming::chunks(&long, n));
            assert_eq!(streamed, whole, "{text:?} in pieces of {n}");
        }
    }
}

/// What a leftover of a non-number match would be is left alone: the
/// host after a password in a URL is not personal data, though the email
/// pattern took it with the password.
#[test]
fn only_numbers_keep_their_leftovers() {
    let r = redactor();
    for (text, kept) in [
        ("postgres://app:Zq8vN4kLm2Xp@db.internal.example.com:5432/app", "@db.internal.example.com:5432/app"),
        ("git clone https://oauth2:ghp_8fK2mQ9xR4tV7wY1zA3bC5dE6gH0jL2nP4sU@github.com/org/repo.git", "@github.com/org/repo.git"),
    ] {
        let (out, counts) = r.redact(text);
        assert!(out.contains(kept), "{out}");
        assert!(!counts.contains_key("email"), "{out}: {counts:?}");
    }
}

/// A long run of small numbers (digits of pi, a bit string) neither
/// stalls a stream nor overflows its hold: it is released as it comes.
#[test]
fn a_long_run_of_numbers_streams() {
    let r = redactor();
    for unit in ["1 ", "0 1 ", "14159 26535 "] {
        let text = unit.repeat(80_000 / unit.len());
        let mut s = crate::redact::stream::StreamRedactor::new(r.clone());
        let mut released = 0;
        for piece in streaming::chunks(&text, 16) {
            released += s.push(piece).len();
        }
        assert!(s.overflow().is_none(), "{unit:?}: the hold overflowed");
        assert!(
            released > text.len() / 2,
            "{unit:?}: only {released} bytes released before the end"
        );
    }
}

/// Searching each rule only near its keywords (or near a match of the
/// keyword-less automaton) finds exactly what searching every rule over
/// the whole text finds, on texts mixing every example, look-alike and
/// filler in any order.
mod windows {
    use super::*;
    use proptest::prelude::*;

    fn pieces() -> Vec<String> {
        let mut p: Vec<String> = examples().into_iter().map(|(_, t)| t).collect();
        p.extend(look_alikes().into_iter().map(|(_, t)| t));
        p.extend(profile_examples().into_iter().map(|(_, t)| t));
        p.extend(
            [
                "plain words ",
                "key: ",
                "token = ",
                "password:",
                "my.db.password = ",
                "x-api-key: ",
                "cohereApiKey=",
                "a.b.c.d.e.f.secret_key: ",
                "-secret-token\t:",
                "\"api_key\" => ",
                "Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i",
                "P@ssw0rd$1xy",
                " 2024-11-22 ",
                "+",
                "@",
                ":",
                "\n",
                "call ",
                "0",
                "4111",
                "é",
                "日本",
            ]
            .map(String::from),
        );
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn same_as_a_whole_text_scan(picks in prop::collection::vec((0usize..1000, 0usize..4), 1..12)) {
            let r = everything();
            let p = pieces();
            let seps = ["", " ", "\n", "="];
            let text: String = picks.iter().map(|(i, s)| format!("{}{}", p[i % p.len()], seps[*s])).collect();
            let whole = vec![
                Places {
                    windows: vec![(0, text.len())],
                    starts: vec![]
                };
                r.rules.len()
            ];
            let full = r.scan_in(&text, &whole, true);
            let windowed = r.scan(&text, 0);
            prop_assert_eq!(windowed.findings, full.findings, "{:?}", text);
            let mut a = windowed.raw.clone();
            let mut b = full.raw.clone();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b, "{:?}", text);
        }
    }
}

mod streaming {
    use super::*;
    use crate::redact::stream::{StreamRedactor, HOLD, MAX_HELD};
    use proptest::prelude::*;
    use std::sync::Arc;

    pub(super) fn stream(r: &Arc<Redactor>, pieces: &[&str]) -> String {
        let mut s = StreamRedactor::new(r.clone());
        let mut out: String = pieces.iter().map(|p| s.push(p)).collect();
        out.push_str(&s.finish());
        out
    }

    /// Split `text` at the given fractions (on character boundaries).
    fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| {
                let mut p = c % (text.len() + 1);
                while !text.is_char_boundary(p) {
                    p -= 1;
                }
                p
            })
            .collect();
        points.push(0);
        points.push(text.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    }

    const WORDS: &[&str] = &[
        "the",
        "key",
        "is",
        "café",
        "日本語",
        "🦀",
        "token:",
        "password",
        "call",
        "at",
        "\n",
        "=",
        "12",
        "ok.",
        "-----BEGIN",
        "-----END",
        "-----",
        " KEY-----",
        "MIIEvQIBADANBgkqhkiG9w0BAQ",
    ];

    /// Split `text` into pieces of `n` characters, as a provider streams
    /// it one event per few characters.
    pub(super) fn chunks(text: &str, n: usize) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, (at, _)) in text.char_indices().enumerate() {
            if i > 0 && i % n == 0 {
                out.push(&text[start..at]);
                start = at;
            }
        }
        out.push(&text[start..]);
        out
    }

    /// How a planted text is split: at random points, or into pieces of a
    /// fixed size from 1 to 64 characters.
    #[derive(Debug, Clone)]
    enum Split {
        Cuts(Vec<usize>),
        Every(usize),
    }

    fn splits() -> impl Strategy<Value = Split> {
        prop_oneof![
            proptest::collection::vec(any::<usize>(), 0..40).prop_map(Split::Cuts),
            (1..=64usize).prop_map(Split::Every),
        ]
    }

    fn pieces<'a>(text: &'a str, how: &Split) -> Vec<&'a str> {
        match how {
            Split::Cuts(cuts) => split(text, cuts),
            Split::Every(n) => chunks(text, *n),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// However the text is split (multi-byte characters included), the
        /// stream gives exactly the whole-text redaction, and no planted
        /// secret survives: short examples of every rule, and each rule's
        /// longest realistic value (longer than the hold-back).
        #[test]
        fn streamed_equals_whole_and_secrets_never_survive(
            words in proptest::collection::vec(0..WORDS.len(), 0..60),
            planted in proptest::collection::vec((any::<prop::sample::Index>(), any::<bool>(), 0..60usize), 1..4),
            how in splits(),
        ) {
            let r = redactor();
            let short = examples();
            let long = long_examples();
            let mut parts: Vec<String> = words.iter().map(|w| WORDS[*w].to_string()).collect();
            let mut secrets = Vec::new();
            for (which, is_long, pos) in planted {
                let list = if is_long { &long } else { &short };
                let (_, text) = which.get(list);
                let at = pos.min(parts.len());
                parts.insert(at, text.clone());
                secrets.push(text.clone());
            }
            let text = parts.join(" ");
            let (whole, _) = r.redact(&text);
            let streamed = stream(&r, &pieces(&text, &how));
            prop_assert_eq!(&streamed, &whole);
            for s in &secrets {
                prop_assert!(!streamed.contains(s.as_str()), "planted {:?} survived in {:?}", s, streamed);
            }
        }
    }

    /// Every long value, every piece size from 1 to 64: the stream equals
    /// the whole-text redaction and the value never survives.
    #[test]
    fn long_values_at_every_chunk_size() {
        let r = redactor();
        for (id, value) in long_examples() {
            let text = format!("Here it is:\n{value}\nKeep it safe.");
            let (whole, counts) = r.redact(&text);
            assert_eq!(counts.get(id), Some(&1), "{id}: {whole}");
            for n in 1..=64 {
                let streamed = stream(&r, &chunks(&text, n));
                assert_eq!(streamed, whole, "{id} in pieces of {n}");
            }
        }
    }

    /// Regression: the end of a first block must not hide a second block
    /// that follows on the same line.
    #[test]
    fn a_closed_block_then_an_open_one() {
        let r = redactor();
        let long = long_examples();
        let text = format!("a {} b {} c", long[2].1, long[0].1);
        let (whole, counts) = r.redact(&text);
        assert_eq!(counts.get("private-key"), Some(&2));
        assert_eq!(stream(&r, &chunks(&text, 37)), whole);
    }

    #[test]
    fn one_character_at_a_time() {
        let r = redactor();
        for (id, text) in examples() {
            let pieces: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let out = stream(&r, &refs);
            assert!(
                out.contains(&format!("[REDACTED:{}]", r.entity(id))),
                "{id}: {out}"
            );
            assert_eq!(out, r.redact(&text).0);
        }
    }

    #[test]
    fn hold_back_is_bounded_for_plain_text() {
        let r = redactor();
        let mut s = StreamRedactor::new(r);
        let mut released = 0;
        for _ in 0..200 {
            released += s
                .push("plain words without anything sensitive in them ")
                .len();
            assert!(s.held() <= HOLD + 64, "held {}", s.held());
        }
        assert!(released > 8000);
    }

    /// Bytes the rules saw to stream `text` in 4-byte pieces.
    fn work(text: &str) -> usize {
        let mut s = StreamRedactor::new(redactor());
        for piece in text.as_bytes().chunks(4) {
            s.push(std::str::from_utf8(piece).unwrap());
        }
        assert_eq!(s.overflow(), None);
        s.scanned()
    }

    #[test]
    fn work_is_linear_in_a_long_held_run() {
        let pem_body = |lines: usize| {
            format!(
                "key: -----BEGIN PRIVATE KEY-----\n{}",
                (0..lines)
                    .map(|i| chars(i as u64, 64, BASE64) + "\n")
                    .collect::<String>()
            )
        };
        let token = |n: usize| format!("token {}", chars(7, n, BASE64));
        let prose = |n: usize| "plain words of a reply ".repeat(n / 23);
        for (what, small, large) in [
            ("an unterminated PEM block", pem_body(200), pem_body(400)),
            ("a growing token", token(13_000), token(26_000)),
            ("prose", prose(13_000), prose(26_000)),
        ] {
            let (a, b) = (work(&small), work(&large));
            // Quadratic work would quadruple; linear work doubles.
            assert!(
                b * 10 <= a * 25,
                "{what}: {a} bytes scanned for {}, {b} for {}",
                small.len(),
                large.len()
            );
        }
    }

    /// Waiting positions are byte offsets: multi-byte text around an open
    /// block, a growing token or a partial end line must neither panic nor
    /// change the result.
    #[test]
    fn waits_survive_multi_byte_text_and_partial_end_lines() {
        let key = pem("PRIVATE KEY", 31, 3);
        let texts = [
            "-----BEGIN日本語 and more 🦀 text".to_string(),
            format!("前 {key} 後 日本語🦀"),
            format!("{}日本{}", &key[..40], &key[40..]),
            "-----BEGIN KEY-----\nabc\n-----END".to_string() + " KEY-----\nnext 日本語",
            "tok日本語🦀🦀🦀 -----BEGIN é".to_string(),
        ];
        for text in &texts {
            for size in 1..12 {
                let mut s = StreamRedactor::new(redactor());
                let mut out = String::new();
                let mut at = 0;
                while at < text.len() {
                    let mut end = (at + size).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    out += &s.push(&text[at..end]);
                    at = end;
                }
                out += &s.finish();
                assert_eq!(
                    out,
                    redactor().redact(text).0,
                    "{text:?} in pieces of {size}"
                );
            }
        }
    }

    #[test]
    fn a_hold_over_the_cap_stops_and_releases_nothing_unscreened() {
        let lines = MAX_HELD / 65 + 10;
        let block = pem("PRIVATE KEY", 4242, lines);
        let unterminated = &block[..block.find("-----END").unwrap()];
        let token = format!("bearer {}", chars(9, MAX_HELD + 100, BASE64));
        for (what, text) in [("PEM block", unterminated.to_string()), ("token", token)] {
            let mut s = StreamRedactor::new(redactor());
            let mut out = String::new();
            for piece in text.as_bytes().chunks(64) {
                out += &s.push(std::str::from_utf8(piece).unwrap());
            }
            assert!(s.overflow().is_some_and(|n| n > MAX_HELD), "{what}");
            assert!(out.len() < 100, "{what}: released {} bytes", out.len());
            // Nothing more comes out once over.
            assert_eq!(s.push(" and more text "), "");
        }
        // Just under the cap, the block still ends and is redacted whole.
        let fits = pem("PRIVATE KEY", 77, MAX_HELD / 65 - 20);
        let mut s = StreamRedactor::new(redactor());
        let mut out = String::new();
        for piece in fits.as_bytes().chunks(4) {
            out += &s.push(std::str::from_utf8(piece).unwrap());
        }
        out += &s.finish();
        assert_eq!(s.overflow(), None);
        assert_eq!(out, redactor().redact(&fits).0);
        assert!(out.contains("[REDACTED:private-key]"), "{}", &out[..80]);
    }

    #[test]
    fn an_open_pem_block_is_held_until_it_ends() {
        let r = redactor();
        let mut s = StreamRedactor::new(r);
        let mut out = s.push("here: -----BEGIN PRIVATE KEY-----\n");
        for _ in 0..100 {
            out += &s.push("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n");
        }
        assert!(
            !out.contains("MIIEvQ"),
            "key material released before the block ended"
        );
        out += &s.push("-----END PRIVATE KEY-----\n done");
        out += &s.finish();
        assert!(
            out.contains("[REDACTED:private-key]") && out.ends_with("done"),
            "{out}"
        );
        assert!(!out.contains("MIIEvQ"));
    }
}

/// The response stage over every field of the chat and completions reply
/// schemas that can carry generated text, JSON and streamed.
mod stage {
    use super::*;
    use crate::chain::Decision;
    use crate::redact::stage::RedactStage;
    use crate::request::Route;
    use crate::response::{ResponseContext, ResponseStage};
    use crate::shared::Shared;
    use crate::sse::SseEvent;
    use serde_json::{json, Value};

    const SECRET: &str = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";

    fn stage() -> RedactStage {
        RedactStage::new(Shared::new(compile()))
    }

    fn ctx(route: Route) -> ResponseContext<'static> {
        ResponseContext {
            request_id: "t",
            route,
            model: None,
            principal: None,
            approvals: Default::default(),
        }
    }

    fn pieces(text: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    fn logprob(token: &str) -> Value {
        json!({"token": token, "logprob": -0.5, "bytes": token.as_bytes(),
            "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": token.as_bytes()}]})
    }

    /// Every token string of a JSON value, joined.
    fn tokens_of(v: &Value) -> String {
        let mut out = String::new();
        if let Some(list) = v.pointer("/logprobs/content").and_then(Value::as_array) {
            for e in list {
                out.push_str(e["token"].as_str().unwrap_or(""));
            }
        }
        out
    }

    /// Token lists longer than the hold, with a secret after an unclosed
    /// `-----BEGIN` block, are dropped, never released unscreened.
    #[test]
    fn json_logprobs_over_the_hold_are_dropped_not_released() {
        let text = format!(
            "-----BEGIN PRIVATE KEY-----\n{} then key {SECRET} ok",
            "a".repeat(70_000)
        );
        let toks: Vec<Value> = pieces(&text, 64).iter().map(|t| logprob(t)).collect();
        let mut body = json!({"choices": [{"index": 0, "finish_reason": "stop",
            "logprobs": {"content": toks, "refusal": null},
            "message": {"role": "assistant", "content": "short"}}]});
        stage()
            .on_json(&ctx(Route::ChatCompletions), &mut body)
            .unwrap();
        let out = body.to_string();
        assert!(!out.contains(SECRET), "the secret was released");
        assert!(
            !out.contains(&SECRET[..SECRET.len() / 2]),
            "half the secret was released"
        );
    }

    #[test]
    fn json_every_text_field_is_redacted() {
        let half = SECRET.len() / 2;
        let toks: Vec<Value> = pieces(&format!("key {SECRET} ok"), 3)
            .iter()
            .map(|t| logprob(t))
            .collect();
        let mut body = json!({"choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": toks, "refusal": null},
             "message": {
                "role": "assistant",
                "content": [{"type": "text", "text": format!("part one {}", &SECRET[..half])},
                            {"type": "text", "text": format!("{} part two", &SECRET[half..])}],
                "refusal": format!("no: {SECRET}"),
                "reasoning_content": format!("thinking {SECRET}"),
                "reasoning": format!("also {SECRET}"),
                "function_call": {"name": "f", "arguments": json!({"k": SECRET}).to_string()},
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "g", "arguments": json!({"a": [SECRET]}).to_string()}},
                    {"id": "c2", "type": "custom", "custom": {"name": "h", "input": format!("raw {SECRET}")}}],
                "audio": {"id": "a1", "data": "UklGRg==", "transcript": format!("say {SECRET}"), "expires_at": 1},
                "annotations": [{"type": "url_citation", "url_citation": {"url": format!("https://x/{SECRET}"), "title": "t"}}],
                "vendor_extra": {"note": SECRET}
             }},
            {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": SECRET}},
            "not an object", 5
        ]});
        let outcome = stage()
            .on_json(&ctx(Route::ChatCompletions), &mut body)
            .unwrap();
        let text = body.to_string();
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            !text.contains(&SECRET[..half]),
            "split across parts: {text}"
        );
        assert!(!tokens_of(&body["choices"][0]).contains(SECRET));
        assert!(tokens_of(&body["choices"][0]).contains("[REDACTED:github-token]"));
        let args: Value = serde_json::from_str(
            body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .expect("arguments stay JSON");
        assert_eq!(args["a"][0], "[REDACTED:github-token]");
        assert_eq!(body["choices"][0]["message"]["audio"]["data"], "");
        assert_eq!(
            body["choices"][0]["message"]["tool_calls"][1]["custom"]["name"],
            "h"
        );
        let Decision::Annotate(a) = outcome else {
            panic!("expected annotations")
        };
        assert_eq!(a[0].value["github-token"], 11, "{:?}", a);
        assert_eq!(a[1].key, "audio_withheld");
    }

    #[test]
    fn json_completions_text_and_legacy_logprobs() {
        let toks = pieces(&format!("a {SECRET} b"), 2);
        let mut body = json!({"choices": [{"index": 0, "text": format!("a {SECRET} b"),
            "logprobs": {"tokens": toks, "token_logprobs": vec![-1.0; toks.len()],
                "top_logprobs": toks.iter().map(|t| json!({t.as_str(): -1.0})).collect::<Vec<_>>(),
                "text_offset": (0..toks.len()).collect::<Vec<_>>()}}]});
        stage()
            .on_json(&ctx(Route::Completions), &mut body)
            .unwrap();
        assert!(!body.to_string().contains("Zq8X"), "{body}");
        let joined: String = body["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(joined, "a [REDACTED:github-token] b");
    }

    fn event(choices: Value) -> SseEvent {
        SseEvent::data(
            json!({"id": "c", "object": "chat.completion.chunk", "choices": choices}).to_string(),
        )
    }

    /// Run events through a stream stage; return every output event's JSON.
    fn run(route: Route, events: Vec<SseEvent>) -> Vec<Value> {
        let mut s = stage().stream(&ctx(route));
        let mut out = Vec::new();
        for e in events {
            s.on_event(e, &mut out).unwrap();
        }
        s.on_event(SseEvent::data("[DONE]"), &mut out).unwrap();
        s.finish(&mut out).unwrap();
        out.iter().filter_map(SseEvent::json).cloned().collect()
    }

    /// A hold that goes over the cap in the very event that finishes the
    /// choice (several content parts, then `finish_reason`): the stage
    /// stops, and the truncated text is not released as if it were whole.
    #[test]
    fn an_overflow_in_the_finishing_event_stops_the_stream() {
        use crate::redact::stream::MAX_HELD;
        let line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7abcdefghijkl\n";
        let body = line.repeat(MAX_HELD / line.len() + 8);
        let parts = json!([
            {"type": "text", "text": "key: -----BEGIN PRIVATE KEY-----\n"},
            {"type": "text", "text": body},
            {"type": "text", "text": "-----END PRIVATE KEY-----"},
        ]);
        let mut s = stage().stream(&ctx(Route::ChatCompletions));
        let mut out = Vec::new();
        let e = event(json!([{"index": 0, "delta": {"content": parts}, "finish_reason": "stop"}]));
        let err = s.on_event(e, &mut out).unwrap_err();
        assert!(err.limit, "{err:?}");
        let text: String = out.iter().map(|e| e.to_string()).collect();
        assert!(
            !text.contains("MIIEvQ"),
            "released: {}",
            &text[..text.len().min(300)]
        );
    }

    /// A field of every choice `index` across events, joined.
    fn joined(events: &[Value], index: u64, pointer: &str) -> String {
        let mut out = String::new();
        for e in events {
            for c in e["choices"].as_array().into_iter().flatten() {
                if c["index"].as_u64() == Some(index) {
                    if let Some(s) = c.pointer(pointer).and_then(Value::as_str) {
                        out.push_str(s);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn stream_several_choices_per_event_and_every_field() {
        let text = format!("the key {SECRET} is here");
        let args = json!({"city": SECRET}).to_string();
        let p = pieces(&text, 3);
        let a = pieces(&args, 3);
        let mut events = vec![event(json!([
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null},
            {"index": 1, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
             "finish_reason": null},
            {"index": 2, "delta": {"role": "assistant"}, "finish_reason": null}
        ]))];
        for i in 0..p.len().max(a.len()) {
            let mut choices = Vec::new();
            if let Some(piece) = p.get(i) {
                choices.push(json!({"index": 0, "delta": {"content": piece}, "logprobs": {"content": [logprob(piece)]}, "finish_reason": null}));
                choices.push(
                    json!({"index": 2, "delta": {"reasoning_content": piece, "refusal": piece,
                    "audio": {"transcript": piece}}, "finish_reason": null}),
                );
            }
            if let Some(piece) = a.get(i) {
                choices.push(json!({"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": null}));
            }
            events.push(event(Value::Array(choices)));
        }
        events.push(event(json!([
            {"index": 0, "delta": {}, "finish_reason": "stop"},
            {"index": 1, "delta": {}, "finish_reason": "tool_calls"}
        ])));
        // Choice 2 never finishes: released before [DONE].
        let out = run(Route::ChatCompletions, events);
        let all = serde_json::to_string(&out).unwrap();
        assert!(!all.contains(SECRET), "{all}");
        let redacted = "the key [REDACTED:github-token] is here";
        assert_eq!(joined(&out, 0, "/delta/content"), redacted);
        assert_eq!(joined(&out, 2, "/delta/reasoning_content"), redacted);
        assert_eq!(joined(&out, 2, "/delta/refusal"), redacted);
        assert_eq!(joined(&out, 2, "/delta/audio/transcript"), redacted);
        let mut toks = String::new();
        for e in &out {
            for c in e["choices"].as_array().into_iter().flatten() {
                if c["index"] == 0 {
                    toks.push_str(&tokens_of(c));
                }
            }
        }
        assert_eq!(toks, redacted);
        let mut args_out = String::new();
        for e in &out {
            for c in e["choices"].as_array().into_iter().flatten() {
                for t in c
                    .pointer("/delta/tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    args_out.push_str(
                        t.pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    );
                }
            }
        }
        let parsed: Value = serde_json::from_str(&args_out).expect("streamed arguments are JSON");
        assert_eq!(parsed["city"], "[REDACTED:github-token]");
    }

    #[test]
    fn stream_content_parts_and_legacy_function_call() {
        let p = pieces(SECRET, 5);
        let mut events: Vec<SseEvent> = p
            .iter()
            .map(|piece| {
                event(
                    json!([{"index": 0, "delta": {"content": [{"type": "text", "text": piece}],
                "function_call": {"arguments": piece}}, "finish_reason": null}]),
                )
            })
            .collect();
        events.push(event(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ));
        let out = run(Route::ChatCompletions, events);
        let all = serde_json::to_string(&out).unwrap();
        assert!(!all.contains("Zq8XvT2"), "{all}");
        assert!(all.contains("[REDACTED:github-token]"));
    }

    /// A text field no schema here names, streamed in pieces by some
    /// provider, is reassembled like `content`.
    #[test]
    fn stream_unknown_text_fields_are_reassembled() {
        let mut events: Vec<SseEvent> = pieces(&format!("hmm {SECRET} ok"), 3)
            .iter()
            .map(|piece| {
                event(json!([{"index": 0, "delta": {"thinking": piece}, "finish_reason": null}]))
            })
            .collect();
        events.push(event(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ));
        let out = run(Route::ChatCompletions, events);
        assert_eq!(
            joined(&out, 0, "/delta/thinking"),
            "hmm [REDACTED:github-token] ok"
        );
    }

    #[test]
    fn stream_completions_text() {
        let events: Vec<SseEvent> = pieces(&format!("x {SECRET} y"), 2)
            .iter()
            .map(|piece| {
                SseEvent::data(
                    json!({"choices": [{"index": 0, "text": piece, "finish_reason": null}]})
                        .to_string(),
                )
            })
            .collect();
        let out = run(Route::Completions, events);
        assert_eq!(joined(&out, 0, "/text"), "x [REDACTED:github-token] y");
    }

    #[test]
    fn stream_audio_is_withheld_when_its_transcript_had_a_secret() {
        let clip = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"pcm bytes");
        let run_with = |transcript: &str| {
            let events = vec![
                event(
                    json!([{"index": 0, "delta": {"audio": {"id": "a", "data": clip, "transcript": transcript}}, "finish_reason": null}]),
                ),
                event(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
            ];
            run(Route::ChatCompletions, events)
        };
        let clean = run_with("hello there");
        assert_eq!(joined(&clean, 0, "/delta/audio/data"), clip);
        let leaky = run_with(&format!("the key is {SECRET}"));
        assert_eq!(joined(&leaky, 0, "/delta/audio/data"), "");
    }

    #[test]
    fn odd_shapes_never_panic() {
        for data in [
            json!(5),
            json!({"choices": 5}),
            json!({"choices": [5, "x", null, {"delta": 5}, {"delta": {"content": 5}}]}),
            json!({"choices": [{"delta": {"tool_calls": "x", "function_call": 1, "audio": [1]}}]}),
            json!({"choices": [{"logprobs": {"content": "x", "tokens": 5}}]}),
            json!({"choices": [{"index": "x", "finish_reason": "stop", "delta": {"content": SECRET}}]}),
            json!({"choices": [{"message": {"tool_calls": {"a": SECRET}, "function_call": SECRET}}]}),
            json!({"choices": [{"delta": {"tool_calls": {"a": SECRET}, "function_call": SECRET}}]}),
        ] {
            let out = run(
                Route::ChatCompletions,
                vec![SseEvent::data(data.to_string())],
            );
            assert!(!serde_json::to_string(&out).unwrap().contains(SECRET));
            let mut body = data.clone();
            stage()
                .on_json(&ctx(Route::ChatCompletions), &mut body)
                .unwrap();
            assert!(!body.to_string().contains(SECRET), "{body}");
        }
    }

    /// A tool's exemptions hold only for a caller allowed to use it, only
    /// for personal data that is a vetted value's whole, and never for a
    /// duplicate key's first value (which parsing would drop unscreened);
    /// in secrets-only mode, personal data never hides a secret.
    #[test]
    fn tool_argument_exemptions_are_narrow() {
        use crate::request::Principal;
        use crate::tool_authz::{ToolPolicy, ToolPolicySpec};
        let spec: ToolPolicySpec = serde_yaml::from_str(
            r#"
tools:
  - id: send_email
    access: { "*": allow }
    constraints:
      - { pointer: /to, regex: '@example\.com$' }
  - { id: crm, access: { "*": allow }, redact_arguments: secrets }
  - { id: ops_crm, access: { ops: allow }, redact_arguments: none }
"#,
        )
        .unwrap();
        let stage = RedactStage::new(Shared::new(compile()))
            .with_tools(Shared::new(ToolPolicy::build(spec).unwrap()));
        let caller = Principal {
            subject: "alice".into(),
            tenant: "t".into(),
            roles: vec!["dev".into()],
        };
        let run = |tool: &str, arguments: &str| -> String {
            let mut body = json!({"choices": [{"index": 0, "message": {"role": "assistant",
                "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": tool, "arguments": arguments}}]}}]});
            let ctx = ResponseContext {
                principal: Some(&caller),
                approvals: Default::default(),
                ..ctx(Route::ChatCompletions)
            };
            stage.on_json(&ctx, &mut body).unwrap();
            body.pointer("/choices/0/message/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
                .unwrap()
                .to_string()
        };
        // Duplicate keys: the first value is gone, not passed.
        let dup = format!(r#"{{"body": "SSN 123-45-6789 {SECRET}", "body": "ok"}}"#);
        let out = run("other", &dup);
        assert!(
            !out.contains("123-45-6789") && !out.contains(SECRET),
            "{out}"
        );
        // Secrets only: a token inside an email-shaped string is found.
        let out = run(
            "crm",
            &json!({"note": format!("x.{SECRET}@b.io")}).to_string(),
        );
        assert!(!out.contains(SECRET), "{out}");
        // A vetted value keeps its email only when the email is all of it.
        let out = run(
            "send_email",
            &json!({"to": "SSN 123-45-6789 x@example.com"}).to_string(),
        );
        assert!(
            !out.contains("123-45-6789") && !out.contains("x@example.com"),
            "{out}"
        );
        let out = run("send_email", &json!({"to": "x@example.com"}).to_string());
        assert!(out.contains("x@example.com"), "{out}");
        // A caller the policy does not let use the tool gets no exemption.
        let out = run("ops_crm", &json!({"email": "eve@corp.test"}).to_string());
        assert!(!out.contains("eve@corp.test"), "{out}");
    }

    /// Tool-call arguments follow the tool policy: vetted pointers keep
    /// their personal data, `secrets` keeps all personal data, `none`
    /// keeps everything; the same in a JSON reply and in a stream.
    #[test]
    fn tool_arguments_follow_the_tool_policy() {
        use crate::tool_authz::{ToolPolicy, ToolPolicySpec};
        let spec: ToolPolicySpec = serde_yaml::from_str(
            r#"
tools:
  - id: send_email
    access: { "*": allow }
    constraints:
      - { pointer: /to, regex: '@example\.com$' }
      - { pointer: /cc~1bcc/0, enum: ["carol@example.com"] }
      - { pointer: /body, max_length: 1000 }
  - { id: crm, access: { "*": allow }, redact_arguments: secrets }
  - { id: vault_put, access: { "*": allow }, redact_arguments: none }
"#,
        )
        .unwrap();
        let stage = RedactStage::new(Shared::new(compile()))
            .with_tools(Shared::new(ToolPolicy::build(spec).unwrap()));
        let args = json!({"to": "bob@example.com", "cc/bcc": ["carol@example.com", "dan@corp.test"],
            "body": format!("from eve@corp.test, key {SECRET}")});
        let expect = |tool: &str| -> Value {
            match tool {
                "send_email" => json!({"to": "bob@example.com",
                    "cc/bcc": ["carol@example.com", "[REDACTED:email]"],
                    "body": "from [REDACTED:email], key [REDACTED:github-token]"}),
                "crm" => {
                    json!({"to": "bob@example.com", "cc/bcc": ["carol@example.com", "dan@corp.test"],
                    "body": "from eve@corp.test, key [REDACTED:github-token]"})
                }
                "vault_put" => args.clone(),
                // Not in the policy: everything.
                _ => {
                    json!({"to": "[REDACTED:email]", "cc/bcc": ["[REDACTED:email]", "[REDACTED:email]"],
                    "body": "from [REDACTED:email], key [REDACTED:github-token]"})
                }
            }
        };
        for tool in ["send_email", "crm", "vault_put", "other"] {
            let call = |arguments: &str| {
                json!([{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": tool, "arguments": arguments}}])
            };
            let mut body = json!({"choices": [{"index": 0, "message": {"role": "assistant",
                "tool_calls": call(&args.to_string())}, "finish_reason": "tool_calls"}]});
            stage
                .on_json(&ctx(Route::ChatCompletions), &mut body)
                .unwrap();
            let got: Value = serde_json::from_str(
                body.pointer("/choices/0/message/tool_calls/0/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(got, expect(tool), "JSON reply, {tool}");

            // Streamed: the name first, then the arguments in pieces.
            let text = args.to_string();
            let mut s = stage.stream(&ctx(Route::ChatCompletions));
            let mut out = Vec::new();
            s.on_event(
                event(
                    json!([{"index": 0, "delta": {"role": "assistant", "tool_calls": call("")}}]),
                ),
                &mut out,
            )
            .unwrap();
            for p in pieces(&text, 7) {
                let e = json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]);
                s.on_event(event(e), &mut out).unwrap();
            }
            s.on_event(
                event(json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
                &mut out,
            )
            .unwrap();
            s.on_event(SseEvent::data("[DONE]"), &mut out).unwrap();
            s.finish(&mut out).unwrap();
            let events: Vec<Value> = out.iter().filter_map(SseEvent::json).cloned().collect();
            let streamed = joined(&events, 0, "/delta/tool_calls/0/function/arguments");
            let got: Value = serde_json::from_str(&streamed).unwrap();
            assert_eq!(got, expect(tool), "stream, {tool}");
        }
        // A value the constraint would refuse (tool authorization in
        // monitor mode lets the call through) is not vetted: redacted.
        let outside = json!({"to": "eve@corp.test", "cc/bcc": ["dan@corp.test"]}).to_string();
        let mut body = json!({"choices": [{"index": 0, "message": {"role": "assistant",
            "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "send_email", "arguments": outside}}]}}]});
        stage
            .on_json(&ctx(Route::ChatCompletions), &mut body)
            .unwrap();
        let got: Value = serde_json::from_str(
            body.pointer("/choices/0/message/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            got,
            json!({"to": "[REDACTED:email]", "cc/bcc": ["[REDACTED:email]"]})
        );
    }
}
