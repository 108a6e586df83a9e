defmodule Ottla.Secrets do
  @moduledoc false
  # Which librdkafka properties hold secrets, and how their values are kept out of everything
  # Ottla shows: `inspect/1` of a connection (the Inspect implementation below), librdkafka's
  # log lines (Ottla.LogSink calls redact_text/1), and crash and supervisor reports (a primary
  # :logger filter, installed by Ottla.LogSink, that redacts `{property, value}` pairs in
  # every report). Errors from the NIF are redacted in Rust (native/ottla_nif/src/config.rs
  # holds the same list; a test keeps the two equal).

  # librdkafka marks these (and sasl.username, ssl.ca.pem, ssl.key.location and the assertion
  # key file, which are names or paths, not secrets) as sensitive in its own debug dumps.
  @properties [
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password"
  ]

  # A dotted (librdkafka-style) property name containing one of these is a secret too, for
  # properties librdkafka may add. Undotted names (`:password`) are left to their owners.
  @words ["password", "secret", "passphrase"]

  @redacted "[REDACTED]"

  @doc "The librdkafka properties whose values are secrets."
  @spec properties() :: [String.t()]
  def properties, do: @properties

  @doc "What replaces a secret."
  @spec redacted() :: String.t()
  def redacted, do: @redacted

  @doc "Whether `key` (a string or atom) names a secret librdkafka property."
  @spec secret?(term) :: boolean
  def secret?(key) when is_binary(key) do
    key = key |> String.trim() |> String.downcase()
    key in @properties or (String.contains?(key, ".") and String.contains?(key, @words))
  end

  def secret?(key) when is_atom(key), do: secret?(Atom.to_string(key))
  def secret?(_key), do: false

  @doc """
  A config list (or map) with the values of secret properties replaced by `"[REDACTED]"`.

      iex> Ottla.Secrets.redact([{"sasl.username", "alice"}, {"sasl.password", "hunter2"}])
      [{"sasl.username", "alice"}, {"sasl.password", "[REDACTED]"}]
  """
  @spec redact(list | map | nil) :: list | map | nil
  def redact(config) when is_list(config) or is_map(config), do: redact_term(config)
  def redact(nil), do: nil

  @doc """
  `term` with the value of every `{secret_property, value}` pair, and of every secret key of
  a map, replaced by `"[REDACTED]"`, at any depth (lists, tuples, maps, structs).
  """
  @spec redact_term(term) :: term
  def redact_term({key, _value} = pair) do
    if secret?(key), do: {key, @redacted}, else: redact_tuple(pair)
  end

  def redact_term(tuple) when is_tuple(tuple), do: redact_tuple(tuple)

  def redact_term(list) when is_list(list), do: redact_list(list)

  # :maps.map/2 also walks structs, which implement no Enumerable.
  def redact_term(map) when is_map(map) do
    :maps.map(fn key, value -> if secret?(key), do: @redacted, else: redact_term(value) end, map)
  end

  def redact_term(other), do: other

  defp redact_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&redact_term/1) |> List.to_tuple()

  # Lists may be improper (iodata in reports).
  defp redact_list([head | tail]), do: [redact_term(head) | redact_list(tail)]
  defp redact_list([]), do: []
  defp redact_list(tail), do: redact_term(tail)

  @doc """
  `text` without what librdkafka may quote from a secret it cannot use: the rest of the line
  after `sasl.oauthbearer.config …:` (its parser quotes what it did not understand), and any
  PEM private key block. Passwords and keys go to OpenSSL or the broker and are never quoted,
  so their errors ("maybe wrong password") stay readable.
  """
  @spec redact_text(String.t()) :: String.t()
  def redact_text(text) when is_binary(text) do
    text
    |> String.replace(~r/(sasl\.oauthbearer\.config[^:=\n]*[:=])[^\n]*/, "\\1 " <> @redacted)
    |> String.replace(
      ~r/-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(-----END \1-----|\z)/s,
      @redacted
    )
  end

  @filter_id :ottla_secrets

  @doc """
  Installs the primary `:logger` filter that redacts secret `{property, value}` pairs in every
  report and format argument (crash reports, supervisor reports, `Logger` reports), whoever
  logs them. Plain string messages are left alone: they cost nothing to pass.
  """
  @spec install_log_filter() :: :ok
  def install_log_filter do
    case :logger.add_primary_filter(@filter_id, {&__MODULE__.log_filter/2, []}) do
      :ok -> :ok
      {:error, {:already_exist, @filter_id}} -> :ok
    end
  end

  @doc "Removes the filter `install_log_filter/0` installed."
  @spec remove_log_filter() :: :ok
  def remove_log_filter do
    _ = :logger.remove_primary_filter(@filter_id)
    :ok
  end

  @doc false
  # The :logger filter: returns the event with secrets redacted. A filter that raises is
  # removed by :logger, and every later report would go out unredacted; so should redacting
  # ever fail, the event is replaced by a line saying so (its secrets cannot be told apart).
  def log_filter(%{msg: msg} = event, _extra) do
    case msg do
      {:report, report} -> %{event | msg: {:report, redact_term(report)}}
      {:string, _} -> :ignore
      {format, args} when is_list(args) -> %{event | msg: {format, redact_term(args)}}
      _ -> :ignore
    end
  rescue
    _ -> %{event | msg: {:string, "(a report Ottla.Secrets could not redact was left out)"}}
  end

  def log_filter(_event, _extra), do: :ignore
end

defimpl Inspect, for: Ottla.Connection do
  # A connection holds its librdkafka config, passwords and keys included: show it redacted.
  def inspect(conn, opts) do
    conn
    |> Map.update!(:config, &Ottla.Secrets.redact/1)
    |> Inspect.Any.inspect(opts)
  end
end
