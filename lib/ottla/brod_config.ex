defmodule Ottla.BrodConfig do
  @moduledoc false
  # Elsa and brod option names in `config:` lists, translated to librdkafka properties (or to
  # Ottla's own options), so an Elsa app's configuration starts unchanged. librdkafka's own
  # properties (dotted names such as "client.id", or any key this module does not know) pass
  # through untouched. Options with no librdkafka counterpart are accepted with a one-time
  # warning that says what Ottla does instead; a few that would silently change guarantees are
  # refused with an ArgumentError.

  require Logger

  @ms_options %{
    connect_timeout: "socket.connection.setup.timeout.ms",
    request_timeout: "socket.timeout.ms",
    ack_timeout: "request.timeout.ms",
    retry_backoff_ms: "retry.backoff.ms",
    max_linger_ms: "linger.ms",
    max_wait_time: "fetch.wait.max.ms"
  }

  @count_options %{
    max_retries: "message.send.max.retries",
    max_batch_size: "batch.size",
    max_linger_count: "batch.num.messages",
    prefetch_count: "queued.min.messages",
    max_bytes: "max.partition.fetch.bytes",
    min_bytes: "fetch.min.bytes"
  }

  @seconds_options %{
    session_timeout_seconds: "session.timeout.ms",
    heartbeat_rate_seconds: "heartbeat.interval.ms"
  }

  # Accepted and ignored, with what Ottla does instead.
  @no_equivalent %{
    auto_start_producers: "producers start with the connection's :producer option",
    allow_topic_auto_creation: "topics are created with Ottla.create_topic/3",
    default_producer_config: "give producer settings in the :producer option's :config",
    reconnect_cool_down_seconds: "librdkafka reconnects on its own (reconnect.backoff.ms)",
    restart_delay_seconds: "a failed consumer is restarted by its supervisor",
    get_metadata_timeout_seconds: "metadata requests use each call's :timeout",
    query_api_versions: "librdkafka negotiates API versions itself",
    rejoin_delay_seconds: "librdkafka rejoins the group on its own",
    offset_commit_policy: "acked offsets are committed to Kafka (see the :offsets option)",
    partition_restart_delay_seconds: "a failed partition worker restarts with :retry_backoff",
    topic_restart_delay_seconds: "a failed partition worker restarts with :retry_backoff",
    extra_sock_opts: "socket options are librdkafka properties (socket.*)",
    sasl_authenticator: "use librdkafka's sasl.* properties"
  }

  @compression %{
    no_compression: "none",
    gzip: "gzip",
    snappy: "snappy",
    lz4: "lz4",
    zstd: "zstd"
  }

  @sasl %{plain: "PLAIN", scram_sha_256: "SCRAM-SHA-256", scram_sha_512: "SCRAM-SHA-512"}

  @doc """
  Splits a `config:` list into librdkafka properties (still as `{key, value}` for
  `Ottla.Options.client_config!/2`) and Ottla options that brod names stood for
  (`:begin_offset`, `:commit_interval`). Raises `ArgumentError` naming a bad option.
  """
  @spec translate(term, atom) :: {list, keyword}
  def translate(config, name) when is_list(config) do
    unless Ottla.Options.proper_list?(config) do
      raise ArgumentError, "invalid #{inspect(name)}: #{inspect(config)} is not a proper list"
    end

    {props, opts} =
      Enum.reduce(config, {[], []}, fn entry, {props, opts} ->
        case entry do
          {key, value} when is_atom(key) and not is_nil(key) ->
            case option(key, value, name) do
              {:props, more} -> {Enum.reverse(more, props), opts}
              {:opt, opt} -> {props, [opt | opts]}
              :ignore -> {props, opts}
              :pass -> {[entry | props], opts}
            end

          other ->
            {[other | props], opts}
        end
      end)

    {security(Enum.reverse(props)), Enum.reverse(opts)}
  end

  def translate(config, _name), do: {config, []}

  defp option(key, value, name) when is_map_key(@ms_options, key),
    do: {:props, [{@ms_options[key], non_neg!(value, key, name)}]}

  defp option(key, value, name) when is_map_key(@count_options, key),
    do: {:props, [{@count_options[key], non_neg!(value, key, name)}]}

  defp option(key, value, name) when is_map_key(@seconds_options, key),
    do: {:props, [{@seconds_options[key], non_neg!(value, key, name) * 1_000}]}

  defp option(:client_id, value, name) when is_binary(value) or is_atom(value),
    do: {:props, [{"client.id", to_string(value)}]} |> tap(fn _ -> check_name(value, name) end)

  defp option(:prefetch_bytes, value, name),
    do:
      {:props,
       [{"queued.max.messages.kbytes", div(non_neg!(value, :prefetch_bytes, name) + 1023, 1024)}]}

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

    props =
      Enum.flat_map(opts, fn
        {:cacertfile, path} ->
          [{"ssl.ca.location", path!(path, :cacertfile, name)}]

        {:certfile, path} ->
          [{"ssl.certificate.location", path!(path, :certfile, name)}]

        {:keyfile, path} ->
          [{"ssl.key.location", path!(path, :keyfile, name)}]

        {:password, password} ->
          # Never shown: a wrong shape is named by its key only.
          case is_list(password) && Ottla.Options.chars(password) do
            _ when is_binary(password) -> [{"ssl.key.password", password}]
            binary when is_binary(binary) -> [{"ssl.key.password", binary}]
            _ -> bad!(name, :ssl, :password, "a string or charlist password")
          end

        {:verify, :verify_peer} ->
          [{"enable.ssl.certificate.verification", "true"}]

        {:verify, :verify_none} ->
          [{"enable.ssl.certificate.verification", "false"}]

        {:server_name_indication, _} ->
          []

        {:depth, _} ->
          []

        # Named by its key only: the value may be a secret.
        {key, _value} ->
          bad!(name, :ssl, key, "cacertfile, certfile, keyfile, password or verify")

        other ->
          bad!(name, :ssl, other, "cacertfile, certfile, keyfile, password or verify")
      end)

    {:props, [{:ssl, props}]}
  end

  defp option(:sasl, {mechanism, user, password}, name) do
    case Map.fetch(@sasl, mechanism) do
      {:ok, mech} when is_binary(user) and is_binary(password) ->
        {:props,
         [
           {:sasl,
            [{"sasl.mechanism", mech}, {"sasl.username", user}, {"sasl.password", password}]}
         ]}

      _ ->
        bad!(
          name,
          :sasl,
          {mechanism, user, "…"},
          "{:plain | :scram_sha_256 | :scram_sha_512, user, password}"
        )
    end
  end

  defp option(:sasl, :undefined, _name), do: :ignore

  defp option(:sasl, _other, name) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry :sasl: expected {:plain | :scram_sha_256 | " <>
            ":scram_sha_512, user, password}"
  end

  defp option(:begin_offset, value, name) do
    case value do
      v when v in [:earliest, :latest] -> {:opt, {:begin_offset, v}}
      v when is_integer(v) and v >= 0 -> {:opt, {:begin_offset, v}}
      other -> bad!(name, :begin_offset, other, ":earliest, :latest or an offset")
    end
  end

  defp option(:offset_reset_policy, value, name) do
    case value do
      :reset_to_earliest ->
        {:opt, {:offset_reset, :earliest}}

      :reset_to_latest ->
        {:opt, {:offset_reset, :latest}}

      :reset_by_subscriber ->
        warn_once(:offset_reset_policy, "out-of-range offsets reset to :begin_offset")

      other ->
        bad!(name, :offset_reset_policy, other, ":reset_to_earliest or :reset_to_latest")
    end
  end

  defp option(:offset_commit_interval_seconds, value, name),
    do: {:opt, {:commit_interval, non_neg!(value, :offset_commit_interval_seconds, name) * 1_000}}

  defp option(:offset_commit_policy, :consumer_managed, _name) do
    raise ArgumentError,
          "offset_commit_policy: :consumer_managed has no direct equivalent: keep offsets in " <>
            "your own store with the group consumer's offsets: {:elsewhere, fun} option"
  end

  defp option(key, _value, _name) when is_map_key(@no_equivalent, key),
    do: warn_once(key, @no_equivalent[key])

  defp option(_key, _value, _name), do: :pass

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

  defp warn_once(key, instead) do
    unless :persistent_term.get({__MODULE__, key}, false) do
      :persistent_term.put({__MODULE__, key}, true)
      Logger.warning("Ottla ignores the brod option #{inspect(key)}: #{instead}")
    end

    :ignore
  end

  defp non_neg!(value, _key, _name) when is_integer(value) and value >= 0, do: value
  defp non_neg!(value, key, name), do: bad!(name, key, value, "a non-negative integer")

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

  defp bad!(name, key, value, expected) do
    raise ArgumentError,
          "invalid #{inspect(name)} entry #{inspect(key)}: #{inspect(value)} (expected #{expected})"
  end
end
