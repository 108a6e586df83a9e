defmodule Ottla.SecurityTest do
  # TLS, mutual TLS and SASL against a real secured broker (`scripts/kafka start --secure`,
  # which scripts/test starts and describes in OTTLA_KAFKA_SECURE_ENV), and proof that
  # secrets appear in no log line, error, inspect output or crash report.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  import Ottla.TestSupport,
    only: [collect_batches: 2, conn_name: 0, group_name: 0, unique_topic: 1, wait_until: 3]

  # Failing calls get this timeout; each must answer within it plus @margin.
  @timeout 2_000
  @margin 1_500

  # Captures every :logger event after the primary filters, formatted by OTP's own formatter
  # (which prints supervisor reports in full, unlike Elixir's Logger by default), and sends it
  # to the test process.
  defmodule Capture do
    @moduledoc false
    def log(event, %{config: %{pid: pid}}) do
      text = :logger_formatter.format(event, %{single_line: false, chars_limit: :unlimited})
      send(pid, {:captured_log, IO.chardata_to_string(text)})
    end
  end

  setup_all do
    env =
      case System.get_env("OTTLA_KAFKA_SECURE_ENV") do
        nil -> %{}
        path -> read_env!(path)
      end

    %{env: env}
  end

  defp read_env!(path) do
    for line <- path |> File.read!() |> String.split("\n", trim: true),
        [key, value] = String.split(line, "=", parts: 2),
        into: %{},
        do: {String.replace_prefix(key, "OTTLA_SECURE_", ""), value}
  end

  # -- client configs (librdkafka property names, as an app would write them) ----------------

  defp ssl(env), do: ["security.protocol": "ssl", "ssl.ca.location": env["CA"]]

  defp client_cert_files(env) do
    ssl(env) ++
      [
        "ssl.certificate.location": env["CLIENT_CERT"],
        "ssl.key.location": env["CLIENT_KEY"],
        "ssl.key.password": env["CLIENT_KEY_PASSWORD"]
      ]
  end

  defp client_cert_inline(env) do
    [
      "security.protocol": "ssl",
      "ssl.ca.pem": File.read!(env["CA"]),
      "ssl.certificate.pem": File.read!(env["CLIENT_CERT"]),
      "ssl.key.pem": File.read!(env["CLIENT_KEY"]),
      "ssl.key.password": env["CLIENT_KEY_PASSWORD"]
    ]
  end

  defp sasl(env, mechanism, user, password) do
    [
      "security.protocol": "sasl_ssl",
      "ssl.ca.location": env["CA"],
      "sasl.mechanism": mechanism,
      "sasl.username": user,
      "sasl.password": password
    ]
  end

  defp sasl(env, "PLAIN"), do: sasl(env, "PLAIN", env["PLAIN_USER"], env["PLAIN_PASSWORD"])

  defp sasl(env, "SCRAM-SHA-" <> bits = mechanism) do
    sasl(env, mechanism, env["SCRAM_SHA_#{bits}_USER"], env["SCRAM_SHA_#{bits}_PASSWORD"])
  end

  # Every secret the broker's env holds, plus the lines of the client's private key.
  defp secrets(env) do
    key_lines =
      env["CLIENT_KEY"]
      |> File.read!()
      |> String.split("\n", trim: true)
      |> Enum.reject(&String.starts_with?(&1, "-----"))

    [
      env["CLIENT_KEY_PASSWORD"],
      env["PLAIN_PASSWORD"],
      env["SCRAM_SHA_256_PASSWORD"],
      env["SCRAM_SHA_512_PASSWORD"]
    ] ++ key_lines
  end

  defp made_up_secret(what), do: "#{what}-#{Base.encode16(:crypto.strong_rand_bytes(12))}"

  # -- helpers ---------------------------------------------------------------------------------

  defp start_connection!(name, bootstrap, config, opts) do
    spec = {Ottla.Supervisor, [connection: name, endpoints: bootstrap, config: config] ++ opts}
    start_supervised!(Supervisor.child_spec(spec, id: name))
  end

  defp timed(fun) do
    started = System.monotonic_time(:millisecond)
    result = fun.()
    {System.monotonic_time(:millisecond) - started, result}
  end

  # Topic admin, produce, fetch, a group consumer and its commits over one secured config.
  defp round_trip!(bootstrap, config) do
    admin = conn_name()
    start_connection!(admin, bootstrap, config, producer: [])
    topic = unique_topic("ottla-secure")

    assert :ok == Ottla.create_topic(admin, topic, partitions: 2)
    assert {:ok, topics} = Ottla.list_topics(admin)
    assert {topic, 2} in topics

    messages = for i <- 1..20, do: {"key-#{i}", "value-#{i}"}
    assert :ok == Ottla.produce(admin, topic, messages)

    fetched =
      for partition <- [0, 1] do
        assert {:ok, _high, batch} = Ottla.fetch(admin, topic, partition: partition)
        batch
      end

    assert fetched |> List.flatten() |> Enum.map(&{&1.key, &1.value}) |> Enum.sort() ==
             Enum.sort(messages)

    for _ <- 1..20 do
      assert {:ok, _, [_ | _]} = Ottla.fetch(admin, topic, partition: 0)
      assert Ottla.topic?(admin, topic)
    end

    # Every call above reused the connection's authenticated clients.
    assert %{admin: 1, fetch: 1} = Ottla.Connection.clients_created(admin)

    group = group_name()

    start_connection!(conn_name(), bootstrap, config,
      group_consumer: [
        group: group,
        topics: [topic],
        handler: Ottla.TestHandler,
        handler_init_args: %{pid: self()},
        begin_offset: :earliest,
        config: ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000]
      ]
    )

    delivered =
      collect_batches(
        fn acc -> acc |> Map.values() |> Enum.map(&length/1) |> Enum.sum() >= 20 end,
        30_000
      )

    assert delivered |> Map.values() |> Enum.map(&length/1) |> Enum.sum() == 20

    # The group's commits went over the same secured connection.
    wait_until(
      fn ->
        {:ok, committed} = Ottla.committed_offsets(admin, group, topic)
        Enum.sum(for {_, offset} <- committed, is_integer(offset), do: offset) == 20
      end,
      15_000,
      "the group to commit all 20 offsets"
    )
  end

  # Admin, fetch and produce calls (on a connection, and a short-lived producer) with a config
  # the broker refuses. Each must return an Ottla.Error by its timeout; the log must name the
  # cause when `cause` is given; no secret of `secrets` may show anywhere.
  defp refused!(ctx, bootstrap, config, cause, secrets, code \\ nil) do
    name = conn_name()
    topic = unique_topic("ottla-secure")
    {{results, conn}, log} = with_log(fn -> run_refused(name, bootstrap, config, topic) end)

    for {call, {ms, result}} <- results do
      assert ms < @timeout + @margin,
             "#{call} answered after #{ms} ms; its timeout was #{@timeout} ms: #{inspect(result)}"

      error =
        case call do
          produce when produce in [:produce, :produce_short_lived] ->
            assert {:error, %Ottla.Error{}, [{{"k", "v"}, %Ottla.Error{} = error}]} = result
            error

          _ ->
            assert {:error, %Ottla.Error{} = error} = result
            error
        end

      # The error itself says why the broker refused the client, and that retrying will not cure it.
      if code do
        assert error.code == code and error.retriable? == false,
               "#{call}: #{inspect(error)}, expected code #{inspect(code)}"
      end
    end

    if cause, do: assert(log =~ cause, "the log does not say why: #{log}")
    refute_secrets([log, inspect(results), conn], secrets ++ secrets(ctx.env))
  end

  defp run_refused(name, bootstrap, config, topic) do
    start_connection!(name, bootstrap, config, producer: [])

    calls = [
      list_topics: fn -> Ottla.list_topics(name, timeout: @timeout) end,
      create_topic: fn -> Ottla.create_topic(name, topic, timeout: @timeout) end,
      fetch: fn -> Ottla.fetch(name, topic, timeout: @timeout) end,
      committed_offsets: fn -> Ottla.committed_offsets(name, "g", topic, timeout: @timeout) end,
      produce: fn -> Ottla.produce(name, topic, {"k", "v"}, timeout: @timeout) end,
      produce_short_lived: fn ->
        Ottla.produce(bootstrap, topic, {"k", "v"}, timeout: @timeout, config: config)
      end
    ]

    results =
      calls
      |> Enum.map(fn {call, fun} -> {call, Task.async(fn -> timed(fun) end)} end)
      |> Enum.map(fn {call, task} -> {call, Task.await(task, @timeout + 10_000)} end)

    conn = inspect(Ottla.Connection.lookup(name))
    stop_supervised!(name)
    flush_logs()
    {results, conn}
  end

  # librdkafka's log lines reach Logger through Ottla.LogSink; wait until it has handled
  # everything sent so far.
  defp flush_logs do
    _ = :sys.get_state(Ottla.LogSink)
    Logger.flush()
  end

  defp refute_secrets(texts, secrets) do
    for text <- texts, secret <- secrets, secret not in [nil, ""] do
      refute String.contains?(text, secret),
             "a secret (#{String.slice(secret, 0, 4)}…) shows in: #{text}"
    end
  end

  # -- working clients -------------------------------------------------------------------------

  describe "TLS, verifying the broker against the CA" do
    @describetag :secure

    test "admin, produce, fetch and a group consumer work over SSL", ctx do
      round_trip!(ctx.env["SSL"], ssl(ctx.env))
    end

    test "a listener with a certificate for another name is refused; without the name check it works",
         ctx do
      refused!(
        ctx,
        ctx.env["WRONG_NAME"],
        ssl(ctx.env),
        ~r/9296.*certificate verify failed/,
        [],
        :ssl
      )

      no_name_check = ssl(ctx.env) ++ ["ssl.endpoint.identification.algorithm": "none"]
      name = conn_name()
      start_connection!(name, ctx.env["WRONG_NAME"], no_name_check, [])
      assert {:ok, _} = Ottla.list_topics(name)
    end
  end

  describe "mutual TLS" do
    @describetag :secure

    test "with the client certificate and its encrypted key as files, on a listener that requires one",
         ctx do
      round_trip!(ctx.env["MTLS"], client_cert_files(ctx.env))
    end

    test "with the CA, certificate and encrypted key given inline (ssl.*.pem)", ctx do
      round_trip!(ctx.env["MTLS"], client_cert_inline(ctx.env))
    end

    test "without a client certificate that listener refuses the client", ctx do
      refused!(ctx, ctx.env["MTLS"], ssl(ctx.env), ~r/9295.*bad certificate/, [])
    end
  end

  describe "SASL_SSL" do
    @describetag :secure

    for mechanism <- ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] do
      test "#{mechanism}: admin, produce, fetch and a group consumer work", ctx do
        round_trip!(ctx.env["SASL_SSL"], sasl(ctx.env, unquote(mechanism)))
      end
    end
  end

  describe "brod's ssl and sasl options, as an Elsa app's config writes them" do
    @describetag :secure

    test "ssl: [cacertfile: ..., verify: :verify_peer]", ctx do
      round_trip!(ctx.env["SSL"], ssl: [cacertfile: ctx.env["CA"], verify: :verify_peer])
    end

    test "ssl with the client certificate, key and key password, as charlists", ctx do
      ssl =
        for {key, env} <- [
              cacertfile: "CA",
              certfile: "CLIENT_CERT",
              keyfile: "CLIENT_KEY",
              password: "CLIENT_KEY_PASSWORD"
            ],
            do: {key, String.to_charlist(ctx.env[env])}

      round_trip!(ctx.env["MTLS"], ssl: ssl)
    end

    test "sasl: {:scram_sha_512, user, password} with ssl", ctx do
      sasl = {:scram_sha_512, ctx.env["SCRAM_SHA_512_USER"], ctx.env["SCRAM_SHA_512_PASSWORD"]}
      round_trip!(ctx.env["SASL_SSL"], ssl: [cacertfile: ctx.env["CA"]], sasl: sasl)
    end

    test "sasl: {:plain, file}, the user and password read from the file", ctx do
      path = Path.join(System.tmp_dir!(), "ottla-sasl-#{System.unique_integer([:positive])}")
      File.write!(path, "#{ctx.env["PLAIN_USER"]}\n#{ctx.env["PLAIN_PASSWORD"]}\n")
      on_exit(fn -> File.rm(path) end)
      round_trip!(ctx.env["SASL_SSL"], ssl: [cacertfile: ctx.env["CA"]], sasl: {:plain, path})
    end
  end

  describe "refused clients get an Ottla.Error by the call's timeout" do
    @describetag :secure

    test "a wrong PLAIN password", ctx do
      wrong = made_up_secret("wrong-plain")
      config = sasl(ctx.env, "PLAIN", ctx.env["PLAIN_USER"], wrong)

      refused!(
        ctx,
        ctx.env["SASL_SSL"],
        config,
        ~r/Invalid username or password/,
        [wrong],
        :authentication
      )
    end

    test "a wrong SCRAM-SHA-256 password", ctx do
      wrong = made_up_secret("wrong-scram")
      config = sasl(ctx.env, "SCRAM-SHA-256", ctx.env["SCRAM_SHA_256_USER"], wrong)
      cause = ~r/Authentication failed.*SCRAM-SHA-256/
      refused!(ctx, ctx.env["SASL_SSL"], config, cause, [wrong], :authentication)
    end

    test "an unknown SCRAM-SHA-512 user", ctx do
      password = made_up_secret("unknown-user")
      config = sasl(ctx.env, "SCRAM-SHA-512", "nobody-#{System.unique_integer()}", password)
      cause = ~r/Authentication failed.*SCRAM-SHA-512/
      refused!(ctx, ctx.env["SASL_SSL"], config, cause, [password], :authentication)
    end

    test "a broker whose certificate no trusted CA signed", ctx do
      config = ["security.protocol": "ssl", "ssl.ca.location": ctx.env["OTHER_CA"]]
      refused!(ctx, ctx.env["SSL"], config, ~r/9293.*certificate verify failed/, [], :ssl)
    end

    test "a plaintext client on the TLS port", ctx do
      # librdkafka only sees the connection close; the log line it writes then may be
      # collapsed with other tests' lines, so none is required here.
      refused!(ctx, ctx.env["SSL"], [], nil, [])
    end
  end

  # -- secrets ---------------------------------------------------------------------------------

  describe "secrets never show" do
    @describetag :secure

    test "in an error about a refused value of a secret property", ctx do
      # This build has no OAuth/OIDC (no libcurl): librdkafka refuses the property and
      # rdkafka's message would end with its value.
      secret = made_up_secret("client-secret")
      config = ssl(ctx.env) ++ ["sasl.oauthbearer.client.secret": secret]

      {results, log} =
        with_log(fn ->
          short_lived = Ottla.produce(ctx.env["SSL"], "t", "v", config: config, timeout: @timeout)

          Process.flag(:trap_exit, true)

          supervised =
            Ottla.Supervisor.start_link(
              connection: conn_name(),
              endpoints: ctx.env["SSL"],
              config: config,
              producer: []
            )

          flush_logs()
          [short_lived, supervised]
        end)

      assert [
               {:error, %Ottla.Error{code: :invalid_config} = error, [{"v", error}]},
               {:error, {:shutdown, {:failed_to_start_child, Ottla.Connection, error}}}
             ] = results

      assert error.message =~ "not supported in this build"
      assert error.message =~ "sasl.oauthbearer.client.secret [REDACTED]"
      refute_secrets([inspect(results), log], [secret])
    end

    test "in an error about a private key that cannot be read, or a wrong key password", ctx do
      key_secret = made_up_secret("KEYMATERIAL")
      password = made_up_secret("key-password")

      bad_key =
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\n#{key_secret}\n-----END ENCRYPTED PRIVATE KEY-----\n"

      real_key = File.read!(ctx.env["CLIENT_KEY"])

      {results, log} =
        with_log(fn ->
          for key <- [bad_key, real_key] do
            config =
              client_cert_inline(ctx.env) ++ ["ssl.key.pem": key, "ssl.key.password": password]

            Ottla.produce(ctx.env["MTLS"], "t", "v", config: config, timeout: @timeout)
          end
        end)

      assert [
               {:error, %Ottla.Error{code: :client_creation, message: unreadable}, _},
               {:error, %Ottla.Error{code: :client_creation, message: wrong_password}, _}
             ] = results

      # The reasons stay readable: only secrets are left out.
      assert unreadable =~ "ssl.key.pem failed"
      assert wrong_password =~ "wrong password"
      refute_secrets([inspect(results), log], [key_secret, password | secrets(ctx.env)])
    end

    test "in librdkafka's log lines, which quote an sasl.oauthbearer.config they cannot parse",
         ctx do
      secret = made_up_secret("oauth-config")

      config = [
        "security.protocol": "sasl_ssl",
        "ssl.ca.location": ctx.env["CA"],
        "sasl.mechanism": "OAUTHBEARER",
        "enable.sasl.oauthbearer.unsecure.jwt": true,
        "sasl.oauthbearer.config": "principal=alice #{secret}"
      ]

      {result, log} =
        with_log(fn ->
          result = Ottla.produce(ctx.env["SASL_SSL"], "t", "v", config: config, timeout: @timeout)
          flush_logs()
          result
        end)

      assert {:error, %Ottla.Error{}, _} = result
      assert log =~ "sasl.oauthbearer.config beginning at: [REDACTED]"
      refute_secrets([inspect(result), log], [secret])
    end

    test "in inspect, stats, crash reports and supervisor reports of a connection", ctx do
      # A connection whose config holds every kind of secret, with a producer and a group.
      pem = made_up_secret("PEMBODY")
      oauth = made_up_secret("oauth-config")

      config =
        sasl(ctx.env, "SCRAM-SHA-512") ++
          [
            "ssl.key.pem":
              "-----BEGIN ENCRYPTED PRIVATE KEY-----\n#{pem}\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "ssl.key.password": ctx.env["CLIENT_KEY_PASSWORD"],
            "sasl.oauthbearer.config": oauth
          ]

      secrets = [pem, oauth | secrets(ctx.env)]
      :ok = :logger.add_handler(:ottla_security_test, Capture, %{config: %{pid: self()}})
      on_exit(fn -> :logger.remove_handler(:ottla_security_test) end)

      name = conn_name()
      refused = conn_name()

      log =
        capture_log(fn ->
          # librdkafka refuses the garbage key: the connection does not start.
          spec =
            {Ottla.Supervisor,
             connection: refused, endpoints: ctx.env["SASL_SSL"], config: config, producer: []}

          assert {:error, _} = start_supervised(Supervisor.child_spec(spec, id: refused))

          # Without it, it starts; then its processes crash.
          config = Keyword.delete(config, :"ssl.key.pem")
          topic = unique_topic("ottla-secure")

          start_connection!(name, ctx.env["SASL_SSL"], config,
            producer: [],
            group_consumer: [
              group: group_name(),
              topics: [topic],
              handler: Ottla.TestHandler,
              handler_init_args: %{pid: self()}
            ]
          )

          conn = Ottla.Connection.lookup(name)
          assert inspect(conn) =~ "[REDACTED]"
          assert {:ok, stats} = wait_until(fn -> ok_stats(name) end, 10_000, "stats")

          state = :sys.get_state(child_pid(name, Ottla.Connection))
          refute_secrets([inspect(conn), inspect(stats), inspect(state)], secrets)

          for child <- [Ottla.Connection, Ottla.Group.Manager] do
            pid = wait_until(fn -> child_pid(name, child) end, 5_000, "#{inspect(child)} to run")
            ref = Process.monitor(pid)
            catch_exit(GenServer.call(pid, :ottla_security_test_crash))
            assert_receive {:DOWN, ^ref, :process, ^pid, _}, 5_000
          end

          flush_logs()
        end)

      captured = drain_captured([])
      assert log =~ "terminating"
      # OTP's reports show the config: the connection's own (string keys) in its crash and
      # supervisor reports, the test supervisor's child spec (atom keys) in its report.
      assert captured =~ ~r/start_error.*Ottla\.Connection/s
      assert captured =~ ~r/<<"sasl\.password">>,\s*<<"\[REDACTED\]">>/
      assert captured =~ ~r/'sasl\.password',\s*<<"\[REDACTED\]">>/
      refute_secrets([log, captured], secrets)
    end
  end

  defp ok_stats(name) do
    case Ottla.stats(name) do
      {:ok, _} = ok -> ok
      _ -> nil
    end
  end

  # The pid of a connection's child `module` (its id is the module or {module, _}).
  defp child_pid(name, module) do
    Ottla.Supervisor.via(name)
    |> Supervisor.which_children()
    |> Enum.find_value(fn {id, pid, _, _} ->
      (id == module or match?({^module, _}, id)) and is_pid(pid) and pid
    end)
  end

  defp drain_captured(acc) do
    receive do
      {:captured_log, text} -> drain_captured([text | acc])
    after
      500 -> acc |> Enum.reverse() |> Enum.join("\n")
    end
  end

  # -- the redaction rules themselves (no broker needed) ---------------------------------------

  describe "Ottla.Secrets" do
    doctest Ottla.Secrets

    test "lists the same secret properties as the NIF, which redacts errors with it" do
      rust = File.read!(Path.expand("../../native/ottla_nif/src/config.rs", __DIR__))
      [_, list] = Regex.run(~r/SECRET_PROPERTIES: &\[&str\] = &\[(.*?)\];/s, rust)

      assert Regex.scan(~r/"([^"]+)"/, list, capture: :all_but_first) |> List.flatten() ==
               Ottla.Secrets.properties()
    end

    test "redacts secret {property, value} pairs at any depth, keeping everything else" do
      term = %{
        opts: [config: [{"sasl.password", "p"}, {:"ssl.key.pem", "k"}, {"client.id", "c"}]],
        tuple: {:x, [{"ssl.truststore.password", "t"}]},
        map: %{"sasl.oauthbearer.client.secret" => "s", "sasl.username" => "u"},
        improper: [{"ssl.key.password", "kp"} | :tail],
        password: "left to its owner"
      }

      assert Ottla.Secrets.redact_term(term) == %{
               opts: [
                 config: [
                   {"sasl.password", "[REDACTED]"},
                   {:"ssl.key.pem", "[REDACTED]"},
                   {"client.id", "c"}
                 ]
               ],
               tuple: {:x, [{"ssl.truststore.password", "[REDACTED]"}]},
               map: %{"sasl.oauthbearer.client.secret" => "[REDACTED]", "sasl.username" => "u"},
               improper: [{"ssl.key.password", "[REDACTED]"} | :tail],
               password: "left to its owner"
             }
    end

    test "redacts what librdkafka quotes from sasl.oauthbearer.config, and private key blocks" do
      assert Ottla.Secrets.redact_text(
               "token: Unrecognized sasl.oauthbearer.config beginning at: s3cr3t x\nnext line"
             ) ==
               "token: Unrecognized sasl.oauthbearer.config beginning at: [REDACTED]\nnext line"

      assert Ottla.Secrets.redact_text(
               "a -----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY----- b"
             ) == "a [REDACTED] b"

      assert Ottla.Secrets.redact_text("ssl.key.pem failed: maybe wrong password") ==
               "ssl.key.pem failed: maybe wrong password"
    end
  end
end
