// The client matrix's checks with Java's HttpClient as newHttpClient()
// returns it (HTTP/2 preferred: it offers h2c on every http:// request).
//
//     java Client.java BASE REUSE TOKEN UPSTREAM
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;

public class Client {
    static void check(String name, boolean condition, Object detail) {
        if (!condition) {
            System.out.println("FAILED " + name + ": " + detail);
            System.exit(1);
        }
        System.out.println("ok " + name);
    }

    public static void main(String[] args) throws Exception {
        String base = args[0], reuse = args[1], token = args[2], upstream = args[3];
        // As it comes, but following redirects (the default is NEVER).
        HttpClient client = HttpClient.newBuilder().followRedirects(HttpClient.Redirect.NORMAL).build();
        HttpClient plain = HttpClient.newHttpClient();
        check("default version is HTTP/2", plain.version() == HttpClient.Version.HTTP_2, plain.version());

        HttpResponse<String> r = plain.send(
            HttpRequest.newBuilder(URI.create(base + "/anything?a=1&a=2&q=%2F%20x")).build(),
            HttpResponse.BodyHandlers.ofString());
        String q = r.body().replaceAll("\\s", "");
        check("query", r.statusCode() == 200 && q.contains("\"a\":[\"1\",\"2\"]") && q.contains("\"q\":\"/x\""), r.body());
        check("h2c offer not forwarded", !r.body().contains("Http2-Settings") && !r.body().contains("\"Upgrade\""), r.body());

        String json = "{\"name\":\"bearer\",\"n\":[1,2,3]}";
        r = plain.send(
            HttpRequest.newBuilder(URI.create(base + "/anything"))
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(json)).build(),
            HttpResponse.BodyHandlers.ofString());
        check("json post", r.statusCode() == 200
            && r.body().contains("\"data\": \"{\\\"name\\\":\\\"bearer\\\",\\\"n\\\":[1,2,3]}\"")
            && r.body().contains("\"Content-Type\": \"application/json\""), r.body());

        String upload = "x".repeat(5 * 1024 * 1024);
        r = plain.send(
            HttpRequest.newBuilder(URI.create(base + "/anything"))
                .header("Content-Type", "text/plain")
                .POST(HttpRequest.BodyPublishers.ofString(upload)).build(),
            HttpResponse.BodyHandlers.ofString());
        check("5 MiB upload, echoed back", r.statusCode() == 200 && r.body().contains(upload), r.body().length());

        String target = URLEncoder.encode(upstream + "/anything/redirected", StandardCharsets.UTF_8);
        r = client.send(
            HttpRequest.newBuilder(URI.create(base + "/redirect-to?url=" + target)).build(),
            HttpResponse.BodyHandlers.ofString());
        check("redirect followed back through the proxy", r.statusCode() == 200
            && r.uri().toString().startsWith(base) && r.body().contains("/anything/redirected"), r.uri());

        for (int i = 0; i < 20; i++) {
            r = plain.send(HttpRequest.newBuilder(URI.create(reuse + "/anything")).build(),
                HttpResponse.BodyHandlers.ofString());
            if (r.statusCode() != 200) check("20 sequential requests", false, r.statusCode());
        }
        System.out.println("ok 20 sequential requests");

        r = plain.send(HttpRequest.newBuilder(URI.create(base + "/anything/status")).build(),
            HttpResponse.BodyHandlers.ofString());
        check("status path masked", r.body().contains("[masked]") && !r.body().contains(token), r.body());
        r = plain.send(HttpRequest.newBuilder(URI.create(base + "/anything")).build(),
            HttpResponse.BodyHandlers.ofString());
        check("token and User-Agent at the upstream",
            r.body().contains("\"Authorization\": \"Bearer " + token + "\"")
                && r.body().contains("\"User-Agent\": \"bearer-proxy/"), r.body());
    }
}
