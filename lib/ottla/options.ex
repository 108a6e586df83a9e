defmodule Ottla.Options do
  @moduledoc false
  # Validation and normalisation of the options shared by the public API.

  @typedoc "`[{host, port}]`, a keyword list like `[localhost: 9092]`, or `\"host:port,...\"`."
  @type endpoints :: [{atom | String.t() | charlist, :inet.port_number()}] | String.t()

  @doc "The one encoding of a place in a partition for the NIF (`position.rs`)."
  # The consumer's start and seeks, assign mode's :begin_offset and fetch all use it.
  def position(:earliest), do: :earliest
  def position(:latest), do: :latest

  def position(offset)
      when is_integer(offset) and offset >= 0 and offset <= 9_223_372_036_854_775_807,
      do: {:offset, offset}

  @doc "Turns endpoints into librdkafka's `host:port,host:port`; raises `ArgumentError`."
  @spec bootstrap!(term) :: String.t()
  def bootstrap!(endpoints) when is_binary(endpoints) do
    unless text?(endpoints) do
      raise ArgumentError,
            "invalid :endpoints #{inspect(endpoints)}: expected UTF-8 text without NUL bytes"
    end

    parts = endpoints |> String.split(",", trim: true) |> Enum.map(&String.trim/1)

    if parts == [] do
      raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: no host:port in it"
    end

    Enum.map_join(parts, ",", fn part ->
      case String.split(part, ":") do
        [host, port] when host != "" -> endpoint!({host, parse_port(port, endpoints)}, endpoints)
        _ -> raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: expected host:port"
      end
    end)
  end

  def bootstrap!([_ | _] = endpoints) do
    unless proper_list?(endpoints) do
      raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: not a proper list"
    end

    Enum.map_join(endpoints, ",", &endpoint!(&1, endpoints))
  end

  def bootstrap!(other) do
    raise ArgumentError,
          "invalid :endpoints #{inspect(other)}: expected [{host, port}], [localhost: 9092] " <>
            "or \"host:port,...\""
  end

  defp parse_port(port, endpoints) do
    case Integer.parse(port) do
      {n, ""} -> n
      _ -> raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: port #{inspect(port)}"
    end
  end

  defp endpoint!({host, port}, endpoints) when is_integer(port) and port in 1..65_535 do
    host =
      cond do
        is_atom(host) and host not in [nil, true, false] ->
          Atom.to_string(host)

        is_binary(host) and host != "" ->
          host

        is_list(host) and host != [] ->
          charlist_host(host, endpoints)

        true ->
          raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: host #{inspect(host)}"
      end

    if not text?(host) or String.contains?(host, [",", " "]) do
      raise ArgumentError, "invalid :endpoints #{inspect(endpoints)}: host #{inspect(host)}"
    end

    "#{host}:#{port}"
  end

  defp endpoint!(other, endpoints) do
    raise ArgumentError,
          "invalid :endpoints #{inspect(endpoints)}: #{inspect(other)} is not {host, port} " <>
            "with a port from 1 to 65535"
  end

  defp charlist_host(host, endpoints) do
    case chars(host) do
      binary when is_binary(binary) ->
        binary

      _ ->
        raise ArgumentError,
              "invalid :endpoints #{inspect(endpoints)}: host #{inspect(host)} is not a charlist"
    end
  end

  @doc "Turns librdkafka properties into `[{String.t(), String.t()}]`; raises naming `name`."
  @spec config!(term, atom) :: [{String.t(), String.t()}]
  def config!(config, name \\ :config)

  def config!(config, name) when is_list(config) or is_map(config) do
    unless is_map(config) or proper_list?(config) do
      raise ArgumentError, "invalid #{inspect(name)}: #{inspect(config)} is not a proper list"
    end

    Enum.map(config, fn
      {key, value} when (is_atom(key) or is_binary(key)) and not is_nil(key) ->
        key = to_string(key)

        unless text?(key) and key != "" do
          raise ArgumentError,
                "invalid #{inspect(name)} property #{inspect(key)}: expected a non-empty " <>
                  "UTF-8 name without NUL bytes"
        end

        {key, config_value!(key, value, name)}

      other ->
        raise ArgumentError,
              "invalid #{inspect(name)} entry #{inspect(other)}: expected {property, value} " <>
                "with an atom or string property"
    end)
  end

  def config!(other, name),
    do:
      raise(
        ArgumentError,
        "invalid #{inspect(name)}: expected a keyword list or map, got #{inspect(other)}"
      )

  # librdkafka takes properties as C strings: a value must be UTF-8 text without NUL bytes.
  defp config_value!(key, value, name) when is_binary(value) do
    unless text?(value) do
      shown = if Ottla.Secrets.secret?(key), do: Ottla.Secrets.redacted(), else: inspect(value)

      raise ArgumentError,
            "invalid #{inspect(name)} value for #{inspect(key)}: #{shown} " <>
              "(expected UTF-8 text without NUL bytes)"
    end

    value
  end

  defp config_value!(_key, value, _name) when is_integer(value) or is_float(value),
    do: to_string(value)

  defp config_value!(_key, value, _name) when is_boolean(value), do: to_string(value)

  defp config_value!(_key, value, _name) when is_atom(value) and not is_nil(value),
    do: Atom.to_string(value)

  defp config_value!(key, value, name) do
    shown = if Ottla.Secrets.secret?(key), do: Ottla.Secrets.redacted(), else: inspect(value)

    raise ArgumentError,
          "invalid #{inspect(name)} value for #{inspect(key)}: #{shown} " <>
            "(expected a string, number, boolean or atom)"
  end

  # librdkafka properties that Ottla sets itself because its guarantees rest on them. A user
  # value could break them silently (auto-commit would commit offsets no handler acked), so
  # they are refused everywhere, with the option to use instead.
  @reserved %{
    "bootstrap.servers" => "it is set from :endpoints",
    "metadata.broker.list" => "it is set from :endpoints",
    "group.id" => "it is set from the group consumer's :group",
    "enable.auto.commit" => "Ottla commits only the offsets handlers acked",
    "auto.commit.enable" => "Ottla commits only the offsets handlers acked",
    "enable.auto.offset.store" => "Ottla stores only the offsets handlers acked",
    "auto.offset.reset" => "it is set from the consumer's :begin_offset",
    "partition.assignment.strategy" => "it is set from the group consumer's :assignment_strategy",
    "delivery.report.only.error" =>
      "Ottla.produce/4 needs a delivery report for every message to answer"
  }

  @doc """
  `client_config!/2` for a connection's or producer's `config:` list, which may also use
  Elsa's brod option names (see `Ottla.BrodConfig`).
  """
  @spec kafka_config!(term, atom) :: [{String.t(), String.t()}]
  def kafka_config!(config, name \\ :config) do
    case Ottla.BrodConfig.translate(config, name) do
      {props, []} ->
        client_config!(props, name)

      {_props, [{option, _} | _]} ->
        raise ArgumentError,
              "invalid #{inspect(name)}: #{inspect(option)} is a consumer setting; give it in " <>
                "the :group_consumer or :consumer options (or their :config)"
    end
  end

  @doc """
  `config!/2` for librdkafka client properties: also refuses the properties Ottla sets itself
  (see `@reserved`), with an `ArgumentError` naming the property and why.
  """
  @spec client_config!(term, atom) :: [{String.t(), String.t()}]
  def client_config!(config, name \\ :config) do
    config = config!(config, name)

    Enum.each(config, fn {key, _} ->
      case Map.fetch(@reserved, key) do
        {:ok, why} ->
          raise ArgumentError,
                "invalid #{inspect(name)}: the librdkafka property #{inspect(key)} cannot be " <>
                  "set, because #{why}"

        :error ->
          :ok
      end
    end)

    config
  end

  @doc """
  Raises unless `name` is a connection name (an atom other than `nil`, `true` and `false`),
  calling it `label` in the message.
  """
  @spec connection!(term, String.t()) :: atom
  def connection!(name, label \\ "connection")

  def connection!(name, _label) when is_atom(name) and name not in [nil, true, false], do: name

  def connection!(other, label),
    do: raise(ArgumentError, "invalid #{label} #{inspect(other)}: expected an atom")

  @doc "Raises unless `topic` is a non-empty UTF-8 string of at most 249 bytes, without NUL."
  @spec topic!(term) :: String.t()
  def topic!(topic) when is_binary(topic) and byte_size(topic) > 0 and byte_size(topic) <= 249 do
    if text?(topic), do: topic, else: bad_topic!(topic)
  end

  def topic!(topic), do: bad_topic!(topic)

  defp bad_topic!(topic),
    do:
      raise(
        ArgumentError,
        "invalid topic #{inspect(topic)}: expected a non-empty UTF-8 string of at most 249 " <>
          "bytes, without NUL bytes"
      )

  @doc """
  Raises unless `value` is a non-empty UTF-8 string without NUL bytes (a name librdkafka
  takes as a C string), naming it `name`.
  """
  @spec name!(term, atom) :: String.t()
  def name!(value, name) do
    unless is_binary(value) and value != "" and text?(value) do
      raise ArgumentError,
            "invalid #{inspect(name)} #{inspect(value)}: expected a non-empty UTF-8 string " <>
              "without NUL bytes"
    end

    value
  end

  @doc "Whether `binary` is UTF-8 text without NUL bytes (what a C string can carry)."
  @spec text?(binary) :: boolean
  def text?(binary), do: String.valid?(binary) and not String.contains?(binary, <<0>>)

  @doc "A charlist (or other chardata) as a binary, or `nil` when it is not one."
  @spec chars(term) :: binary | nil
  def chars(list) do
    case proper_list?(list) && :unicode.characters_to_binary(list) do
      binary when is_binary(binary) -> binary
      _ -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "Whether `term` is a proper list (`[a | b]` with a non-list tail is not)."
  @spec proper_list?(term) :: boolean
  def proper_list?([]), do: true
  def proper_list?([_ | tail]), do: proper_list?(tail)
  def proper_list?(_), do: false

  @doc """
  Raises unless `value` is an integer from `min` to `max` (Kafka's int32 range by default),
  naming option `name`.
  """
  @spec integer!(term, atom, integer, integer) :: integer
  def integer!(value, name, min, max \\ 2_147_483_647)

  def integer!(value, _name, min, max) when is_integer(value) and value >= min and value <= max,
    do: value

  def integer!(value, name, min, max),
    do:
      raise(
        ArgumentError,
        "invalid #{inspect(name)}: expected an integer from #{min} to #{max}, got #{inspect(value)}"
      )

  @doc "Raises unless `value` is a timeout in milliseconds (at most a day), naming `name`."
  @spec timeout!(term, atom, non_neg_integer) :: non_neg_integer
  def timeout!(value, name, min \\ 1), do: integer!(value, name, min, 86_400_000)

  @doc "`Keyword.validate!/2` that also rejects a non-keyword argument with a clear message."
  @spec keyword!(term, keyword | [atom], String.t()) :: keyword
  def keyword!(opts, allowed, what) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "invalid #{what}: expected a keyword list, got #{inspect(opts)}"
    end

    Keyword.validate!(opts, allowed)
  end
end
