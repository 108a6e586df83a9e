defmodule Ottla.BrodConfig do
  @moduledoc false
  # Elsa and brod option names in `config:` lists, translated to librdkafka properties (or to
  # Ottla's own options), so an Elsa app's configuration starts unchanged. The migration guide
  # (guides/migrating-from-elsa.md) lists every name this module knows and what it becomes;
  # test/ottla/brod_config_test.exs checks the guide's tables against this module.
  #
  # The rules:
  #   * A value brod took is translated to its nearest meaning. Where librdkafka's range is
  #     narrower than brod's (brod's `min_bytes: 0`, librdkafka's smallest `fetch.min.bytes` is
  #     1), the value moves to the nearest one librdkafka allows, with a warning unless the
  #     guide documents the translation as the usual case.
  #   * Values brod tolerated without using them right (`offset_reset_policy: :earliest`) are
  #     accepted with a warning that says what Ottla does.
  #   * Options with no librdkafka counterpart are accepted with a one-time warning that says
  #     what Ottla does instead.
  #   * Values brod itself would refuse, and a few options that would silently change Ottla's
  #     guarantees, raise an ArgumentError naming the option.
  #
  # librdkafka's own properties (dotted names such as "client.id", or any key this module does
  # not know) pass through untouched; librdkafka refuses names it does not know when the
  # client is created.

  require Logger

  # brod option => {librdkafka property, factor to librdkafka's unit, librdkafka's min, max}
  # (ranges from librdkafka 2.12.1's rdkafka_conf.c). A value outside the range moves to its
  # bound, with a warning.
  @ranged %{
    connect_timeout: {"socket.connection.setup.timeout.ms", 1, 1_000, 2_147_483_647},
    request_timeout: {"socket.timeout.ms", 1, 10, 300_000},
    ack_timeout: {"request.timeout.ms", 1, 1, 900_000},
    max_bytes: {"max.partition.fetch.bytes", 1, 1, 1_000_000_000},
    prefetch_count: {"queued.min.messages", 1, 1, 10_000_000},
    session_timeout_seconds: {"session.timeout.ms", 1_000, 1, 3_600_000},
    heartbeat_rate_seconds: {"heartbeat.interval.ms", 1_000, 1, 3_600_000}
  }

  # Options that only mean something together; translated after the whole list is read.
  @fetch [:min_bytes, :max_wait_time, :sleep_timeout]
  @linger [:max_linger_ms, :max_linger_count]

  # brod's defaults where a combination needs them (brod_consumer.erl).
  @brod_min_bytes 0
  @brod_max_wait_time 10_000
  @brod_sleep_timeout 1_000

  # librdkafka warns, and requests time out, unless socket.timeout.ms (60 s by default)
  # exceeds fetch.wait.max.ms by a second.
  @socket_timeout_default 60_000

  # Accepted and ignored, with what Ottla does instead.
  @no_equivalent %{
    # client
    restart_delay_seconds: "a failed connection is restarted by its supervisor",
    get_metadata_timeout_seconds: "metadata requests use each call's :timeout",
    query_api_versions:
      "librdkafka asks brokers for their API versions (brokers older than Kafka 0.10 need " <>
        "\"api.version.request\": false and \"broker.version.fallback\")",
    auto_start_producers:
      "Elsa's produce looks producers up by topic, so brod's auto-started producers never " <>
        "served it; give the connection a :producer, which serves every topic",
    default_producer_config: "give producer settings in the :producer option's :config",
    unknown_topic_cache_ttl: "librdkafka caches topic metadata itself (metadata.max.age.ms)",
    sasl_authenticator: "use librdkafka's sasl.* properties",
    # producer
    topic_restart_delay_seconds:
      "librdkafka's producer does not restart per topic; a message is retried until " <>
        "message.timeout.ms",
    partition_restart_delay_seconds:
      "librdkafka's producer does not restart per partition; a message is retried until " <>
        "message.timeout.ms",
    produce_req_vsn: "librdkafka negotiates the produce request version",
    # consumer
    size_stat_window:
      "librdkafka grows a fetch for a message larger than max.partition.fetch.bytes itself",
    # group
    rejoin_delay_seconds: "librdkafka rejoins the group on its own",
    max_rejoin_attempts: "librdkafka rejoins the group without a limit",
    rebalance_timeout_seconds:
      "librdkafka sends max.poll.interval.ms as the rebalance timeout; Ottla's poll thread " <>
        "never stops polling",
    offset_retention_seconds:
      "brokers since Kafka 2.1 keep a group's offsets for offsets.retention.minutes after " <>
        "the group empties",
    partition_assignment_strategy:
      "the group consumer's :assignment_strategy (:cooperative_sticky by default) assigns " <>
        "partitions",
    protocol_name: "the protocol name follows the group consumer's :assignment_strategy"
  }

  # Accepted only with values of the given kind, then ignored with the reason.
  @no_equivalent_checked %{
    share_leader_conn:
      {:boolean, "librdkafka keeps one connection per broker for all of a client's partitions"},
    partition_buffer_limit:
      {:positive,
       "a produce call waits for its messages' delivery; librdkafka's " <>
         "queue.buffering.max.messages bounds the whole producer"},
    partition_onwire_limit:
      {:positive,
       "the idempotent producer keeps messages in order with up to 5 requests in flight " <>
         "per broker"}
  }

  @compression %{
    no_compression: "none",
    gzip: "gzip",
    snappy: "snappy",
    lz4: "lz4",
    zstd: "zstd"
  }

  @sasl %{plain: "PLAIN", scram_sha_256: "SCRAM-SHA-256", scram_sha_512: "SCRAM-SHA-512"}

  # Erlang ssl options that librdkafka (OpenSSL) has no setting for: ignored with the reason.
  @ssl_ignored %{
    server_name_indication: "librdkafka sends each broker's host name as the SNI",
    depth: "OpenSSL's verification depth applies",
    versions: "OpenSSL negotiates the TLS version",
    ciphers: "set librdkafka's ssl.cipher.suites (OpenSSL's format)",
    customize_hostname_check:
      "librdkafka checks the broker's host name, wildcards included " <>
        "(ssl.endpoint.identification.algorithm)",
    reuse_sessions: "OpenSSL's session handling applies",
    secure_renegotiate: "OpenSSL's renegotiation handling applies",
    honor_cipher_order: "OpenSSL's cipher order applies",
    log_level: "librdkafka logs TLS errors through Logger",
    log_alert: "librdkafka logs TLS errors through Logger"
  }

  # extra_sock_opts entries with a librdkafka socket property.
  @sock_opts %{
    sndbuf: "socket.send.buffer.bytes",
    recbuf: "socket.receive.buffer.bytes",
    keepalive: "socket.keepalive.enable",
    nodelay: "socket.nagle.disable"
  }

  @doc "Every brod/Elsa option name this module translates, accepts or refuses."
  @spec known_options() :: [atom]
  def known_options do
    (Map.keys(@ranged) ++
       @fetch ++
       @linger ++
       Map.keys(@no_equivalent) ++
       Map.keys(@no_equivalent_checked) ++
       [
         :client_id,
         :prefetch_bytes,
         :max_batch_size,
         :max_retries,
         :retry_backoff_ms,
         :reconnect_cool_down_seconds,
         :allow_topic_auto_creation,
         :extra_sock_opts,
         :isolation_level,
         :required_acks,
         :compression,
         :ssl,
         :sasl,
         :begin_offset,
         :offset_reset_policy,
         :offset_commit_interval_seconds,
         :offset_commit_policy
       ])
    |> Enum.uniq()
  end

  @doc """
  Splits a `config:` list into librdkafka properties (still as `{key, value}` for
  `Ottla.Options.client_config!/2`) and Ottla options that brod names stood for
  (`:begin_offset`, `:offset_reset`, `:commit_interval`). Raises `ArgumentError` naming a bad
  option.
  """
  @spec translate(term, atom) :: {list, keyword}
  def translate(config, name) when is_map(config), do: translate(Map.to_list(config), name)

  def translate(config, name) when is_list(config) do
    unless Ottla.Options.proper_list?(config) do
      raise ArgumentError, "invalid #{inspect(name)}: #{inspect(config)} is not a proper list"
    end

    {props, opts, groups} =
      Enum.reduce(config, {[], [], %{}}, fn entry, {props, opts, groups} ->
        case entry do
          {key, value} when key in @fetch or key in @linger ->
            group = if key in @fetch, do: :fetch, else: :linger
            # The group's properties go where its first option stood.
            props = if Map.has_key?(groups, group), do: props, else: [{:group, group} | props]
            {props, opts, Map.update(groups, group, %{key => value}, &Map.put(&1, key, value))}

          {key, value} when is_atom(key) and not is_nil(key) ->
            case option(key, value, name) do
              {:props, more} -> {Enum.reverse(more, props), opts, groups}
              {:opt, opt} -> {props, [opt | opts], groups}
              :ignore -> {props, opts, groups}
              :pass -> {[entry | props], opts, groups}
            end

          other ->
            {[other | props], opts, groups}
        end
      end)

    props =
      props
      |> Enum.reverse()
      |> Enum.flat_map(fn
        {:group, :fetch} -> fetch(groups.fetch, config, name)
        {:group, :linger} -> linger(groups.linger, name)
        entry -> [entry]
      end)

    {security(props), Enum.reverse(opts)}
  end

  def translate(config, _name), do: {config, []}

  @doc false
  # Tests only: forget which one-time warnings were logged, so a test can see them.
  def forget_warnings do
    for {{__MODULE__, _} = key, _} <- :persistent_term.get(), do: :persistent_term.erase(key)
    :ok
  end

  # brod's prefetch_count is max(value, 0): a negative one meant 0.
  defp option(:prefetch_count, value, name) when is_integer(value) and value < 0,
    do: option(:prefetch_count, tolerated_negative(value, :prefetch_count, name), name)

  defp option(key, value, name) when is_map_key(@ranged, key) do
    {property, factor, min, max} = @ranged[key]
    {:props, [{property, ranged(key, non_neg!(value, key, name) * factor, min, max, property)}]}
  end

  defp option(:client_id, value, name) when is_binary(value) or is_atom(value),
    do: {:props, [{"client.id", to_string(value)}]} |> tap(fn _ -> check_name(value, name) end)

  defp option(:client_id, value, name), do: bad!(name, :client_id, value, "a string")

  # brod stops fetching ahead only when both prefetch_count and prefetch_bytes are exceeded,
  # librdkafka when either is: see the guide.
  defp option(:prefetch_bytes, value, name) do
    kbytes = div(tolerated_negative(value, :prefetch_bytes, name) + 1023, 1024)

    {:props,
     [
       {"queued.max.messages.kbytes",
        ranged(:prefetch_bytes, kbytes, 1, 2_097_151, "queued.max.messages.kbytes")}
     ]}
  end

  defp option(:max_batch_size, value, name),
    do:
      {:props,
       [
         {"batch.size",
          ranged(
            :max_batch_size,
            positive!(value, :max_batch_size, name),
            1,
            2_147_483_647,
            "batch.size"
          )}
       ]}

  # brod: -1 retries without a limit; librdkafka's largest count is its default.
  defp option(:max_retries, -1, _name),
    do: {:props, [{"message.send.max.retries", 2_147_483_647}]}

  defp option(:max_retries, value, _name) when is_integer(value) and value >= 0,
    do:
      {:props,
       [
         {"message.send.max.retries",
          ranged(:max_retries, value, 0, 2_147_483_647, "message.send.max.retries")}
       ]}

  defp option(:max_retries, value, name),
    do: bad!(name, :max_retries, value, "-1 (retry without a limit) or a non-negative integer")

  # brod waits retry_backoff_ms between attempts; librdkafka backs off exponentially up to
  # retry.backoff.max.ms: the same bound for both keeps brod's fixed wait.
  defp option(:retry_backoff_ms, value, name) do
    ms =
      ranged(
        :retry_backoff_ms,
        non_neg!(value, :retry_backoff_ms, name),
        1,
        300_000,
        "retry.backoff.ms"
      )

    {:props, [{"retry.backoff.ms", ms}, {"retry.backoff.max.ms", ms}]}
  end

  # brod waits this long before reconnecting, every time: librdkafka's first and longest
  # backoff both.
  defp option(:reconnect_cool_down_seconds, value, name) do
    ms =
      ranged(
        :reconnect_cool_down_seconds,
        non_neg!(value, :reconnect_cool_down_seconds, name) * 1_000,
        0,
        3_600_000,
        "reconnect.backoff.ms"
      )

    {:props, [{"reconnect.backoff.ms", ms}, {"reconnect.backoff.max.ms", ms}]}
  end

  defp option(:allow_topic_auto_creation, value, _name) when is_boolean(value),
    do: {:props, [{"allow.auto.create.topics", value}]}

  defp option(:allow_topic_auto_creation, value, name),
    do: bad!(name, :allow_topic_auto_creation, value, "true or false")

  defp option(:isolation_level, value, _name) when value in [:read_committed, :read_uncommitted],
    do: {:props, [{"isolation.level", Atom.to_string(value)}]}

  defp option(:isolation_level, value, name),
    do: bad!(name, :isolation_level, value, ":read_committed or :read_uncommitted")

  defp option(:extra_sock_opts, opts, name) when is_list(opts) do
    unless Ottla.Options.proper_list?(opts),
      do: bad!(name, :extra_sock_opts, opts, "a list of gen_tcp options")

    {:props, Enum.flat_map(opts, &sock_opt(&1, name))}
  end

  defp option(:extra_sock_opts, opts, name),
    do: bad!(name, :extra_sock_opts, opts, "a list of gen_tcp options")

  defp option(:required_acks, value, name) do
    acks =
      case value do
        v when v in [-1, :all_isr, :all] -> "all"
        v when v in [1, :leader_only] -> "1"
        v when v in [0, :none] -> "0"
        other -> bad!(name, :required_acks, other, "-1/:all_isr, 1/:leader_only or 0/:none")
      end

    # An idempotent producer needs acks=all: weaker acks turn idempotence off.
    extra = if acks == "all", do: [], else: [{"enable.idempotence", "false"}]
    {:props, [{"acks", acks} | extra]}
  end

  defp option(:compression, value, name) do
    case Map.fetch(@compression, value) do
      {:ok, codec} ->
        {:props, [{"compression.codec", codec}]}

      :error ->
        bad!(name, :compression, value, ":no_compression, :gzip, :snappy, :lz4 or :zstd")
    end
  end

  defp option(:ssl, true, _name), do: {:props, [{:ssl, []}]}
  defp option(:ssl, false, _name), do: :ignore

  defp option(:ssl, opts, name) when is_list(opts) do
    unless Ottla.Options.proper_list?(opts),
      do: bad!(name, :ssl, opts, "a keyword list of ssl options")

    {:props, [{:ssl, Enum.flat_map(opts, &ssl_opt(&1, name))}]}
  end

  defp option(:ssl, other, name),
    do: bad!(name, :ssl, other, "true, false or a keyword list of ssl options")

  defp option(:sasl, {:callback, module, _opts}, name) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry :sasl: brod's SASL callback module " <>
            "#{inspect(module)} has no counterpart; use librdkafka's properties " <>
            "(\"sasl.mechanism\": \"GSSAPI\" and \"sasl.kerberos.*\" for Kerberos, " <>
            "\"sasl.mechanism\": \"OAUTHBEARER\" and \"sasl.oauthbearer.*\" for OAuth)"
  end

  defp option(:sasl, {mechanism, user, password}, name) do
    with {:ok, mech} <- Map.fetch(@sasl, mechanism),
         user when is_binary(user) <- chars(user),
         password when is_binary(password) <- chars(password) do
      {:props, [{:sasl, sasl_props(mech, user, password)}]}
    else
      _ ->
        bad!(
          name,
          :sasl,
          {mechanism, user, "…"},
          "{:plain | :scram_sha_256 | :scram_sha_512, user, password}"
        )
    end
  end

  # brod's {mechanism, file}: the file's first line is the user, its second the password.
  defp option(:sasl, {mechanism, path}, name) when is_map_key(@sasl, mechanism) do
    file = path!(path, :sasl, name)

    case File.read(file) do
      {:ok, text} ->
        case String.split(text, ["\r\n", "\n"]) do
          [user, password | _] when user != "" and password != "" ->
            {:props, [{:sasl, sasl_props(@sasl[mechanism], user, password)}]}

          _ ->
            raise ArgumentError,
                  "invalid #{inspect(name)} entry :sasl: #{inspect(file)} does not hold a user " <>
                    "on its first line and a password on its second"
        end

      {:error, reason} ->
        raise ArgumentError,
              "invalid #{inspect(name)} entry :sasl: cannot read #{inspect(file)} " <>
                "(#{:file.format_error(reason)})"
    end
  end

  defp option(:sasl, :undefined, _name), do: :ignore

  defp option(:sasl, _other, name) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry :sasl: expected {:plain | :scram_sha_256 | " <>
            ":scram_sha_512, user, password} or {mechanism, file}"
  end

  defp option(:begin_offset, value, name) do
    case value do
      v when v in [:earliest, :latest] -> {:opt, {:begin_offset, v}}
      # brod's (kafka_protocol's) numbers for earliest and latest.
      -2 -> {:opt, {:begin_offset, :earliest}}
      -1 -> {:opt, {:begin_offset, :latest}}
      v when is_integer(v) and v >= 0 -> {:opt, {:begin_offset, v}}
      other -> bad!(name, :begin_offset, other, ":earliest, :latest, -2, -1 or an offset")
    end
  end

  defp option(:offset_reset_policy, value, name) do
    case value do
      :reset_to_earliest ->
        {:opt, {:offset_reset, :earliest}}

      :reset_to_latest ->
        {:opt, {:offset_reset, :latest}}

      # brod read the policy only when an offset was out of range (and then crashed on these
      # values), so apps that wrote them started: their nearest meaning, with a warning.
      short when short in [:earliest, :latest] ->
        warn_once(
          {:offset_reset_policy, short},
          "Ottla takes the brod option offset_reset_policy: #{inspect(short)} as " <>
            ":reset_to_#{short} (brod accepted it at start but could not apply it)"
        )

        {:opt, {:offset_reset, short}}

      :reset_by_subscriber ->
        warn_once(
          {:offset_reset_policy, :reset_by_subscriber},
          "Ottla ignores the brod option offset_reset_policy: :reset_by_subscriber: " <>
            "out-of-range offsets reset to :begin_offset"
        )

        :ignore

      other ->
        bad!(
          name,
          :offset_reset_policy,
          other,
          ":reset_to_earliest, :reset_to_latest or :reset_by_subscriber"
        )
    end
  end

  defp option(:offset_commit_interval_seconds, value, name),
    do: {:opt, {:commit_interval, non_neg!(value, :offset_commit_interval_seconds, name) * 1_000}}

  # brod's default, and what Ottla does: acked offsets are committed to Kafka.
  defp option(:offset_commit_policy, :commit_to_kafka_v2, _name), do: :ignore

  defp option(:offset_commit_policy, :consumer_managed, _name) do
    raise ArgumentError,
          "offset_commit_policy: :consumer_managed has no direct equivalent: keep offsets in " <>
            "your own store with the group consumer's offsets: {:elsewhere, fun} option"
  end

  defp option(:offset_commit_policy, value, name),
    do: bad!(name, :offset_commit_policy, value, ":commit_to_kafka_v2 or :consumer_managed")

  defp option(key, value, name) when is_map_key(@no_equivalent_checked, key) do
    {kind, instead} = @no_equivalent_checked[key]

    case {kind, value} do
      {:boolean, v} when is_boolean(v) -> :ok
      {:positive, v} when is_integer(v) and v > 0 -> :ok
      {:boolean, v} -> bad!(name, key, v, "true or false")
      {:positive, v} -> bad!(name, key, v, "a positive integer (brod refuses others too)")
    end

    ignored(key, instead)
  end

  defp option(key, _value, _name) when is_map_key(@no_equivalent, key),
    do: ignored(key, @no_equivalent[key])

  defp option(_key, _value, _name), do: :pass

  # brod: at least min_bytes, waiting up to max_wait_time; with its default min_bytes: 0 the
  # broker answers at once, even empty, and brod sleeps sleep_timeout after an empty answer.
  # librdkafka's smallest fetch.min.bytes is 1 (the broker answers once there is a byte), and
  # it does not sleep after an empty answer: the nearest to brod's "answer at once, ask again
  # after sleep_timeout" is to let the broker hold a fetch no longer than brod slept.
  # librdkafka sends one fetch per broker for all its partitions, so a long hold would also
  # delay partitions assigned or resumed meanwhile, which brod's fetch per partition did not.
  defp fetch(given, config, name) do
    Enum.each(given, fn {key, value} -> non_neg!(value, key, name) end)
    min_bytes = Map.get(given, :min_bytes, @brod_min_bytes)
    max_wait = Map.get(given, :max_wait_time, @brod_max_wait_time)

    {min_bytes, wait} =
      if min_bytes == 0 do
        {1, min(max_wait, Map.get(given, :sleep_timeout, @brod_sleep_timeout))}
      else
        if Map.has_key?(given, :sleep_timeout) do
          ignored(
            :sleep_timeout,
            "with min_bytes above 0 the broker holds an empty fetch for max_wait_time, and " <>
              "librdkafka asks again at once"
          )
        end

        {ranged(:min_bytes, min_bytes, 1, 100_000_000, "fetch.min.bytes"), max_wait}
      end

    wait = ranged(:max_wait_time, wait, 0, 300_000, "fetch.wait.max.ms")

    socket =
      if wait + 1_000 > @socket_timeout_default and not socket_timeout_given?(config),
        do: [{"socket.timeout.ms", min(wait + 1_000, 300_000)}],
        else: []

    [{"fetch.min.bytes", min_bytes}, {"fetch.wait.max.ms", wait} | socket]
  end

  defp socket_timeout_given?(config) do
    Enum.any?(config, fn
      {key, _} when key in [:request_timeout, :"socket.timeout.ms", "socket.timeout.ms"] -> true
      _ -> false
    end)
  end

  # brod lets messages linger only while fewer than max_linger_count wait and the oldest is
  # younger than max_linger_ms: with its default max_linger_count: 0 nothing lingers, whatever
  # max_linger_ms says. librdkafka sends a batch once batch.num.messages wait or linger.ms
  # passed.
  defp linger(given, name) do
    Enum.each(given, fn {key, value} -> non_neg!(value, key, name) end)
    count = Map.get(given, :max_linger_count, 0)
    ms = Map.get(given, :max_linger_ms, 0)

    cond do
      count == 0 and ms > 0 ->
        ignored(
          :max_linger_ms,
          "without max_linger_count brod sends at once, and so does Ottla (linger.ms=0)"
        )

        [{"linger.ms", 0}]

      count == 0 ->
        [{"linger.ms", 0}]

      true ->
        [
          {"linger.ms", ranged(:max_linger_ms, ms, 0, 900_000, "linger.ms")},
          {"batch.num.messages",
           ranged(:max_linger_count, count, 1, 1_000_000, "batch.num.messages")}
        ]
    end
  end

  defp sock_opt({key, value}, name) when is_map_key(@sock_opts, key) do
    property = @sock_opts[key]

    case {key, value} do
      {buffer, bytes} when buffer in [:sndbuf, :recbuf] and is_integer(bytes) and bytes >= 0 ->
        [{property, ranged({:extra_sock_opts, key}, bytes, 0, 100_000_000, property)}]

      {flag, bool} when flag in [:keepalive, :nodelay] and is_boolean(bool) ->
        [{property, bool}]

      _ ->
        bad!(name, :extra_sock_opts, {key, value}, "a valid #{inspect(key)} socket option")
    end
  end

  defp sock_opt(other, _name) do
    shown = if is_tuple(other) and tuple_size(other) > 0, do: elem(other, 0), else: other

    warn_once(
      {:extra_sock_opts, shown},
      "Ottla ignores #{inspect(other)} in the brod option :extra_sock_opts: librdkafka has " <>
        "socket properties only for sndbuf, recbuf, keepalive and nodelay (socket.*)"
    )

    []
  end

  defp ssl_opt({:cacertfile, path}, name),
    do: [{"ssl.ca.location", path!(path, {:ssl, :cacertfile}, name)}]

  defp ssl_opt({:certfile, path}, name),
    do: [{"ssl.certificate.location", path!(path, {:ssl, :certfile}, name)}]

  defp ssl_opt({:keyfile, path}, name),
    do: [{"ssl.key.location", path!(path, {:ssl, :keyfile}, name)}]

  defp ssl_opt({:password, password}, name) do
    # Never shown: a wrong shape is named by its key only.
    case chars(password) do
      binary when is_binary(binary) -> [{"ssl.key.password", binary}]
      _ -> bad!(name, :ssl, :password, "a string or charlist password")
    end
  end

  defp ssl_opt({:verify, :verify_peer}, _name),
    do: [{"enable.ssl.certificate.verification", "true"}]

  defp ssl_opt({:verify, :verify_none}, _name),
    do: [{"enable.ssl.certificate.verification", "false"}]

  defp ssl_opt({key, _value}, _name) when is_map_key(@ssl_ignored, key) do
    warn_once(
      {:ssl, key},
      "Ottla ignores the ssl option #{inspect(key)}: #{@ssl_ignored[key]}"
    )

    []
  end

  defp ssl_opt({key, _value}, name) when key in [:cacerts, :cert, :key] do
    raise ArgumentError,
          "invalid #{inspect(name)} entry :ssl: #{inspect(key)} (DER in the config) has no " <>
            "counterpart; give files (cacertfile, certfile, keyfile) or PEM text in " <>
            "\"ssl.ca.pem\", \"ssl.certificate.pem\" and \"ssl.key.pem\""
  end

  defp ssl_opt({:verify_fun, _fun}, name) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry :ssl: :verify_fun has no counterpart (librdkafka " <>
            "verifies with OpenSSL); use verify: :verify_none, or librdkafka's ssl.* properties"
  end

  # Named by its key only: the value may be a secret.
  defp ssl_opt({key, _value}, name),
    do: bad!(name, :ssl, key, "cacertfile, certfile, keyfile, password or verify")

  defp ssl_opt(other, name),
    do: bad!(name, :ssl, other, "cacertfile, certfile, keyfile, password or verify")

  defp sasl_props(mechanism, user, password),
    do: [{"sasl.mechanism", mechanism}, {"sasl.username", user}, {"sasl.password", password}]

  # ssl and sasl together make SASL_SSL; each alone SSL or SASL_PLAINTEXT.
  # Entries that are not pairs pass through untouched: `Ottla.Options.config!/2` refuses
  # them, naming them.
  defp security(props) do
    ssl = Enum.find_value(props, fn entry -> match?({:ssl, _}, entry) && elem(entry, 1) end)
    sasl = Enum.find_value(props, fn entry -> match?({:sasl, _}, entry) && elem(entry, 1) end)
    rest = Enum.reject(props, &match?({key, _} when key in [:ssl, :sasl], &1))

    protocol =
      case {ssl, sasl} do
        {nil, nil} -> []
        {_, nil} -> [{"security.protocol", "ssl"}]
        {nil, _} -> [{"security.protocol", "sasl_plaintext"}]
        {_, _} -> [{"security.protocol", "sasl_ssl"}]
      end

    protocol ++ (ssl || []) ++ (sasl || []) ++ rest
  end

  # A value librdkafka's range does not hold moves to its nearest bound, with a warning.
  defp ranged(_key, value, min, max, _property) when value >= min and value <= max, do: value

  defp ranged(key, value, min, max, property) do
    bound = if value < min, do: min, else: max

    shown =
      if is_tuple(key), do: "#{inspect(elem(key, 1))} in :extra_sock_opts", else: inspect(key)

    warn_once(
      {:range, key},
      "Ottla sets the brod option #{shown} as #{property}=#{bound}: it asks for #{value}, " <>
        "librdkafka allows #{min} to #{max}"
    )

    bound
  end

  defp ignored(key, instead) do
    warn_once(key, "Ottla ignores the brod option #{inspect(key)}: #{instead}")
    :ignore
  end

  defp warn_once(key, message) do
    unless :persistent_term.get({__MODULE__, key}, false) do
      :persistent_term.put({__MODULE__, key}, true)
      Logger.warning(message)
    end

    :ignore
  end

  # brod took max(value, 0) for these.
  defp tolerated_negative(value, _key, _name) when is_integer(value) and value >= 0, do: value

  defp tolerated_negative(value, key, _name) when is_integer(value) do
    warn_once(
      {:negative, key},
      "Ottla takes the brod option #{inspect(key)} #{value} as 0, as brod did"
    )

    0
  end

  defp tolerated_negative(value, key, name), do: bad!(name, key, value, "an integer")

  defp non_neg!(value, _key, _name) when is_integer(value) and value >= 0, do: value
  defp non_neg!(value, key, name), do: bad!(name, key, value, "a non-negative integer")

  defp positive!(value, _key, _name) when is_integer(value) and value > 0, do: value

  defp positive!(value, key, name),
    do: bad!(name, key, value, "a positive integer (brod refuses others too)")

  defp chars(value) when is_binary(value), do: value
  defp chars(value) when is_list(value), do: Ottla.Options.chars(value)
  defp chars(_value), do: nil

  defp path!(path, _key, _name) when is_binary(path), do: path

  defp path!(path, key, name) when is_list(path) do
    case Ottla.Options.chars(path) do
      binary when is_binary(binary) -> binary
      _ -> bad!(name, key, path, "a file path")
    end
  end

  defp path!(other, key, name), do: bad!(name, key, other, "a file path")

  defp check_name(value, name) do
    if value in [nil, true, false], do: bad!(name, :client_id, value, "a string")
  end

  # An ssl option is named with the entry it is in.
  defp bad!(name, {:ssl, option}, value, expected),
    do: bad!(name, :ssl, value, "#{inspect(option)} to be #{expected}")

  defp bad!(name, key, value, expected) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry #{inspect(key)}: #{inspect(value)} (expected #{expected})"
  end
end
